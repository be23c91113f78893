"""``fraudd console`` in a real browser (Debian's chromium through Playwright) against a real
console, a real ``fraudd run``, PostgreSQL and Redis: sign in, claim, read a case, verdicts that
become labels and teach the scoring, blocks that decline the next transaction, two analysts
claiming at once, the keyboard, roles, CSRF and session expiry; the rules page: a lead's draft
checked as it is typed and tested on the stored decisions, maker-checker, and another lead's publish
that the scoring then decides with; a lead changing a queue's SLA and an admin managing users.

The queue, case, SLA and users screenshots of README's "For analysts" and the rules page's of
"Changing rules safely" are taken here (docs/console-*.png)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from playwright.sync_api import Browser, Page, expect, sync_playwright

from fraudd.keys import Keys
from fraudd.localservers import free_port
from fraudd.rulesets import backtest
from fraudd.scoring.confirmed import ConfirmedFraud
from fraudd.scoring.settings import DEFAULT_RULES

from .conftest import REDIS_URL, Namespace, migrated_namespace, wait_for
from .console_site import CHROMIUM, PASSWORD, Site, csrf_token, sign_in, start_site

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    client = redis.Redis.from_url(REDIS_URL, protocol=2)
    try:
        for ns in migrated_namespace(client):
            yield from start_site(ns, client)
    finally:
        client.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    yield context.new_page()
    context.close()


def second_page(browser: Browser) -> Page:
    return browser.new_context(viewport={"width": 1400, "height": 900}).new_page()


def test_claim_read_and_fraud_verdict_with_a_block(site: Site, page: Page) -> None:
    # Three customers with some history, whose large transactions share an IP address (linked).
    for customer in ("cust-ana", "cust-ben", "cust-cho"):
        site.transactions(2, amount=40.0, user_id=customer)
    ids = [
        site.transactions(1, amount=20_000.0 + 2_500 * i, user_id=customer, ip="203.0.113.7")[0]
        for i, customer in enumerate(("cust-ana", "cust-ben", "cust-cho"))
    ]
    ids += site.transactions(5, amount=10_000.0)
    decisions = site.cases(ids)
    assert set(decisions.values()) <= {"review", "decline"}
    sign_in(page, site, "alice")
    expect(page.get_by_role("table", name="Cases")).to_contain_text(ids[0])
    cookie = next(c for c in page.context.cookies() if c["name"] == "fraudd_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "console-queue.png"))

    page.get_by_role("button", name="Claim next").click()
    page.wait_for_url("**/cases/**")
    claimed = page.get_by_role("heading", level=1).inner_text()
    assert site.sql("SELECT state, assignee FROM cases WHERE transaction_id = %s", (claimed,)) == [("claimed", "alice")]
    device, card = site.sql("SELECT device_id, card_id FROM transactions WHERE transaction_id = %s", (claimed,))[0]
    expect(page.get_by_role("region", name="Decision", exact=True)).to_contain_text("R_LARGE_AMOUNT")
    expect(page.get_by_role("region", name="Transaction", exact=True)).to_contain_text(device)
    expect(page.get_by_role("region", name="History", exact=True)).to_contain_text("claim")
    expect(page.get_by_role("table", name="Linked customers")).to_contain_text("ip:203.0.113.7")
    expect(page.get_by_role("table", name=re.compile("Recent transactions"))).to_contain_text("40.00")
    page.get_by_label("Verdict note").fill("card holder denies it")
    page.screenshot(path=str(DOCS / "console-case.png"), full_page=True)

    page.get_by_role("checkbox", name=f"device {device}").check()
    page.get_by_role("checkbox", name=f"card {card}").check()
    page.get_by_role("button", name="Fraud", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("Verdict recorded.")

    assert site.sql("SELECT label, source FROM label_history WHERE transaction_id = %s", (claimed,)) == [
        ("fraud", "console:alice")
    ]
    assert site.sql("SELECT label, source FROM labels WHERE transaction_id = %s", (claimed,)) == [("fraud", "console:alice")]
    assert site.sql("SELECT state, verdict, resolved_by FROM cases WHERE transaction_id = %s", (claimed,)) == [
        ("resolved", "fraud", "alice")
    ]
    actions = [row[0] for row in site.sql("SELECT action FROM console_audit WHERE transaction_id = %s ORDER BY id", (claimed,))]
    assert actions == ["claim", "verdict", "note", "block", "block"]
    # The label-fed counts: the device now has one confirmed fraud for the scoring to see.
    counts = ConfirmedFraud(site.redis, Keys(site.ns.stream, "", "")).counts(
        ([None], [device], [None], [None]), np.array([int(time.time() * 1000)])
    )
    assert counts["device_fraud_7d"].tolist() == [1.0]

    # The blocks: the next transaction on that device, or with that card on a device of its own,
    # small and otherwise harmless, is declined.
    (after,) = site.transactions(1, amount=12.0, device_id=device)
    (on_card,) = site.transactions(1, amount=12.0, card_id=card)
    decision, reasons = site.decision(after)
    assert decision == "decline" and "R_BLOCKED_DEVICE" in reasons
    decision, reasons = site.decision(on_card)
    assert decision == "decline" and "R_BLOCKED_CARD" in reasons and "R_BLOCKED_DEVICE" not in reasons

    # A resolved case is resolved once: a second verdict is refused and stores nothing.
    page.goto(f"{site.url}/cases/{claimed}")
    expect(page.get_by_role("button", name="Legitimate")).to_have_count(0)
    response = page.request.post(
        f"{site.url}/cases/{claimed}/verdict", form={"csrf": csrf_token(page), "verdict": "legit", "typology": ""}
    )
    assert "resolved already" in response.url.replace("+", " ")
    assert site.sql("SELECT count(*) FROM label_history WHERE transaction_id = %s", (claimed,)) == [(1,)]


def test_two_analysts_claiming_at_once_get_different_cases(site: Site, browser: Browser, page: Page) -> None:
    site.cases(site.transactions(4))
    other = second_page(browser)
    sign_in(page, site, "bob")
    sign_in(other, site, "carol")
    page.get_by_role("button", name="Claim next").click(no_wait_after=True)
    other.get_by_role("button", name="Claim next").click(no_wait_after=True)
    page.wait_for_url("**/cases/**")
    other.wait_for_url("**/cases/**")
    mine, theirs = page.get_by_role("heading", level=1).inner_text(), other.get_by_role("heading", level=1).inner_text()
    assert mine != theirs
    assert site.sql("SELECT assignee FROM cases WHERE transaction_id = ANY(%s) ORDER BY assignee", ([mine, theirs],)) == [
        ("bob",),
        ("carol",),
    ]
    for analyst_page in (page, other):
        analyst_page.get_by_role("button", name="Release").click()
        expect(analyst_page.get_by_role("status")).to_have_text("Case released to the queue.")
    other.context.close()


def test_keyboard_shortcuts(site: Site, page: Page) -> None:
    site.cases(site.transactions(2))
    sign_in(page, site, "alice")
    page.keyboard.press("?")
    expect(page.get_by_role("dialog", name="Keyboard shortcuts")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_be_hidden()
    page.keyboard.press("j")
    first = page.locator("a[data-row]").first
    expect(first).to_be_focused()
    page.keyboard.press("j")
    expect(page.locator("a[data-row]").nth(1)).to_be_focused()
    page.keyboard.press("k")
    expect(first).to_be_focused()

    page.keyboard.press("c")
    page.wait_for_url("**/cases/**")
    claimed = page.get_by_role("heading", level=1).inner_text()
    page.keyboard.press("n")
    expect(page.get_by_label("New note")).to_be_focused()
    page.keyboard.type("seen this customer before")  # typed into the note: no shortcut fires
    page.get_by_role("button", name="Add note").click()
    expect(page.get_by_role("region", name="Notes", exact=True)).to_contain_text("seen this customer before")
    page.keyboard.press("l")
    expect(page.get_by_role("status")).to_have_text("Verdict recorded.")
    assert site.sql("SELECT label, source FROM labels WHERE transaction_id = %s", (claimed,)) == [("legit", "console:alice")]


def test_an_analyst_cannot_reach_a_leads_action(site: Site, browser: Browser, page: Page) -> None:
    (open_case,) = site.cases(site.transactions(1))
    sign_in(page, site, "alice")
    bulk = {"csrf": csrf_token(page), "transaction_id": open_case, "confirm": "yes"}
    assert page.request.post(f"{site.url}/bulk", form=bulk).status == 403
    assert page.request.get(f"{site.url}/audit.csv").status == 403
    assert page.request.get(f"{site.url}/users").status == 403
    assert site.sql("SELECT state FROM cases WHERE transaction_id = %s", (open_case,)) == [("open",)]
    refused = site.sql("SELECT subject, after->>'needs' FROM console_audit WHERE actor = 'alice' AND action = 'forbidden'")
    assert ("POST /bulk", "lead") in refused and ("GET /audit.csv", "lead") in refused and ("GET /users", "admin") in refused

    lead = second_page(browser)
    sign_in(lead, site, "dave")
    lead.get_by_role("checkbox", name=f"Select {open_case}").check()
    lead.get_by_role("checkbox", name="Confirm").check()
    lead.get_by_role("button", name="Mark selected Legitimate").click()
    expect(lead.get_by_role("status")).to_have_text("Bulk verdict recorded.")
    assert site.sql("SELECT label, source FROM labels WHERE transaction_id = %s", (open_case,)) == [("legit", "console:dave")]
    export = lead.request.get(f"{site.url}/audit.csv")
    assert export.status == 200 and export.headers["content-type"].startswith("text/csv")
    assert "bulk_verdict" in export.text() and "forbidden" in export.text()
    lead.context.close()


def test_a_post_without_the_csrf_token_is_refused(site: Site, page: Page) -> None:
    (case,) = site.cases(site.transactions(1))
    sign_in(page, site, "alice")
    for form in ({"note": "forged"}, {"note": "forged", "csrf": "not-the-token"}):
        response = page.request.post(f"{site.url}/cases/{case}/notes", form=form)
        assert response.status == 403
    assert site.sql("SELECT count(*) FROM case_notes WHERE transaction_id = %s", (case,)) == [(0,)]
    assert site.sql(
        "SELECT count(*) FROM console_audit WHERE action = 'csrf_refused' AND subject = %s", (f"/cases/{case}/notes",)
    ) == [(2,)]
    # The sign-in form has its own token: a login posted from elsewhere is refused too.
    assert page.request.post(f"{site.url}/login", form={"username": "alice", "password": "x"}).status == 403


def test_an_idle_session_expires(site: Site, page: Page) -> None:
    sign_in(page, site, "carol")
    site.sql("UPDATE console_sessions SET last_seen = last_seen - interval '2 hours' WHERE username = 'carol' RETURNING 1")
    page.reload()
    page.wait_for_url("**/login?expired=1")
    expect(page.get_by_role("status")).to_have_text("Your session expired: sign in again.")
    assert page.request.post(f"{site.url}/claim", form={"decision": "review"}, max_redirects=0).status == 401


def test_sign_in_is_throttled_after_failures(site: Site, page: Page) -> None:
    for _ in range(5):
        page.goto(site.url + "/login")
        page.get_by_label("Username").fill("erin")
        page.get_by_label("Password").fill("wrong password")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("status")).to_have_text("Wrong username or password.")
    page.goto(site.url + "/login")
    page.get_by_label("Username").fill("erin")
    page.get_by_label("Password").fill("correct horse battery")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("status")).to_have_text("Too many failed sign-ins: try again in 15 minutes.")
    assert site.sql("SELECT count(*) FROM console_sessions WHERE username = 'erin'") == [(0,)]


# Declines what the tests of this module never send otherwise: amounts from 777 up to 780.
RULE_777 = """
[[rule]]
code = "R_CONSOLE_777"
reason = "amounts of 777 to 780"
action = "decline"
all = [{ feature = "amount", op = ">=", value = 777 }, { feature = "amount", op = "<", value = 780 }]
"""


def test_a_lead_drafts_and_tests_a_rule_another_lead_publishes_it_and_rolls_back(
    site: Site, browser: Browser, page: Page
) -> None:
    earlier = site.transactions(3, amount=777.0)  # 777, 778, 779: what the test of the draft reads
    expected = {}
    for txid in earlier:
        decision, _ = site.decision(txid)
        if decision != "decline":
            expected[f"{decision}->decline"] = expected.get(f"{decision}->decline", 0) + 1
    # The live set, published from the command line by a lead of the console (the same check as the page's).
    first = site.ns.fraudd("rules", "import", str(DEFAULT_RULES), "--actor", "root").stdout.strip()
    assert site.ns.fraudd("rules", "publish", first, "--actor", "dave").returncode == 0

    sign_in(page, site, "dave")
    page.get_by_role("link", name="Rules", exact=True).click()
    expect(page.get_by_role("table", name="Rule sets")).to_contain_text(f"{first} live root dave", use_inner_text=True)
    page.get_by_role("link", name="New draft").click()
    editor = page.get_by_label("Rules", exact=True)
    expect(editor).to_have_value(DEFAULT_RULES.read_text())
    editor.fill(DEFAULT_RULES.read_text() + RULE_777.replace('"amount", op = "<"', '"amount_typo", op = "<"'))
    validation = page.locator("#validation")
    expect(validation).to_contain_text("(R_CONSOLE_777)")
    expect(validation).to_contain_text("unknown feature 'amount_typo'")
    editor.fill(DEFAULT_RULES.read_text() + RULE_777)
    expect(validation).to_contain_text("Valid:")
    page.get_by_label("Note").fill("decline 777 to 780")
    page.get_by_role("button", name="Save draft").click()
    page.wait_for_url(re.compile(r"/rules/\d+"))
    draft = page.url.rsplit("/", 1)[-1].split("?")[0]
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Rule set {draft} draft")

    page.get_by_role("button", name="Run test").click()
    report = page.get_by_role("region", name="Test report")
    expect(report).to_contain_text("Extra cases per day")
    changing = page.get_by_role("table", name="Decisions changing")
    for pair, count in expected.items():
        expect(changing).to_contain_text(f"{pair} {count} ", use_inner_text=True)
    expect(page.get_by_role("table", name="Top rules")).to_contain_text("R_CONSOLE_777")
    page.screenshot(path=str(DOCS / "console-rules.png"), full_page=True)

    # Maker-checker: its author may not publish it; an analyst may not publish at all. Both audited.
    with page.expect_response(lambda answer: answer.url.endswith("/publish")) as own:
        page.get_by_role("button", name="Publish").click()
    assert own.value.status == 403
    expect(page.get_by_role("main")).to_contain_text("maker-checker")
    analyst = second_page(browser)
    sign_in(analyst, site, "alice")
    analyst.goto(f"{site.url}/rules/{draft}")
    expect(analyst.get_by_role("button", name="Publish")).to_have_count(0)
    assert analyst.request.post(f"{site.url}/rules/{draft}/publish", form={"csrf": csrf_token(analyst)}).status == 403
    analyst.context.close()
    assert site.sql(
        "SELECT after->>'needs' FROM console_audit WHERE actor = 'alice' AND subject = %s", (f"POST /rules/{draft}/publish",)
    ) == [("lead",)]
    assert site.sql(
        "SELECT actor, detail->>'refused' FROM rules_audit WHERE action = 'refused' AND version = %s", (int(draft),)
    ) == [("dave", "publish")]
    assert site.sql("SELECT status FROM rule_sets WHERE version = %s", (int(draft),)) == [("draft",)]

    checker = second_page(browser)
    sign_in(checker, site, "lena")
    checker.goto(f"{site.url}/rules/diff?a={first}&b={draft}")
    expect(checker.get_by_role("region", name="Rules changed").get_by_role("listitem")).to_have_text(["+ R_CONSOLE_777"])
    checker.goto(f"{site.url}/rules/{draft}")
    checker.get_by_role("button", name="Publish").click()
    expect(checker.get_by_role("status")).to_contain_text("Published")
    expect(checker.get_by_role("heading", level=1)).to_have_text(f"Rule set {draft} live")
    assert site.sql(
        "SELECT actor, detail->>'self_approved' FROM rules_audit WHERE action = 'publish' AND version = %s", (int(draft),)
    ) == [("lena", "false")]

    # The scoring decides its next batch with it, and with the earlier set again once rolled back.
    (after,) = site.transactions(1, amount=778.5)
    decision, reasons = site.decision(after)
    assert decision == "decline" and "R_CONSOLE_777" in reasons
    assert site.sql("SELECT rules_version FROM transactions WHERE transaction_id = %s", (after,)) == [(draft,)]
    checker.goto(f"{site.url}/rules/{first}")
    checker.get_by_role("button", name="Roll back to this version").click()
    expect(checker.get_by_role("status")).to_contain_text("Rolled back")
    expect(checker.get_by_role("heading", level=1)).to_have_text(f"Rule set {first} live")
    checker.context.close()
    (later,) = site.transactions(1, amount=778.5)
    assert "R_CONSOLE_777" not in site.decision(later)[1]
    assert site.sql("SELECT rules_version FROM transactions WHERE transaction_id = %s", (later,)) == [(first,)]


def test_a_backtest_asked_for_while_another_runs_is_refused_at_once(site: Site, page: Page) -> None:
    """A rules test reads its whole window: one runs at a time for the whole console, whichever of
    its processes is asked, and one asked for meanwhile is answered at once, to be tried again."""
    version = site.ns.fraudd("rules", "import", str(DEFAULT_RULES), "--actor", "root").stdout.strip()
    sign_in(page, site, "carol")
    page.goto(f"{site.url}/rules/{version}")
    form = {"csrf": csrf_token(page), "since": "1h", "minutes_per_case": "5"}
    with backtest.turn(site.ns.postgres_url, site.ns.schema):  # another backtest running
        for _ in range(4):
            busy = page.request.post(f"{site.url}/rules/{version}/test", form=form)
            assert (busy.status, busy.headers["retry-after"]) == (503, "30")
            assert "A backtest is running; try again when it has finished." in busy.text()
    done = page.request.post(f"{site.url}/rules/{version}/test", form=form)
    assert done.status == 200 and "Extra cases per day" in done.text()


def sample(name: str, text: str) -> float:
    """The sum of the samples of ``name`` (with its labels, if given) in a /metrics page."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_metrics(site: Site) -> None:
    """After the tests above: the queue's gauges, verdicts per analyst and their time-to-verdict."""
    text = ""
    open_cases = site.sql("SELECT count(*) FROM cases WHERE state = 'open' AND decision = 'review'")[0][0]

    def exported() -> bool:  # the gauges follow the cases at the next housekeeping (every 5 s)
        nonlocal text
        text = httpx.get(site.metrics_url, timeout=5).text
        return sample('fraudd_console_queue_depth{decision="review",state="open"}', text) == open_cases

    wait_for(exported, 15, message="the queue gauges")
    assert sample("fraudd_console_oldest_open_case_age_seconds", text) > 0
    assert sample('fraudd_console_verdicts_total{analyst="alice",verdict="fraud"}', text) == 1
    assert sample('fraudd_console_verdicts_total{analyst="dave",verdict="legit"}', text) == 1
    assert sample('fraudd_console_time_to_verdict_seconds_count{analyst="alice"}', text) == 2
    assert sample('fraudd_console_sla_seconds{decision="review"}', text) == 4 * 3600


def test_a_lead_changes_a_queues_sla_and_the_queue_follows(site: Site, browser: Browser, page: Page) -> None:
    (case,) = ids = site.transactions(1)
    decision = site.cases(ids)[case]
    # Two hours old: within the 4-hour SLA, past a 1-hour one. Its stored rank is left as it was:
    # the SLA's change re-ranks the queue.
    site.sql("UPDATE cases SET created_at = created_at - interval '2 hours' WHERE transaction_id = %s RETURNING 1", (case,))
    analyst = second_page(browser)
    sign_in(analyst, site, "alice")
    analyst.goto(f"{site.url}/sla")
    expect(analyst.get_by_role("table", name="SLAs")).to_contain_text("4 h 00 min")
    expect(analyst.get_by_role("button", name=re.compile("Save"))).to_have_count(0)
    refused = analyst.request.post(f"{site.url}/sla", form={"csrf": csrf_token(analyst), "decision": decision, "minutes": "1"})
    assert refused.status == 403
    assert site.sql("SELECT after->>'needs' FROM console_audit WHERE actor = 'alice' AND subject = 'POST /sla'") == [("lead",)]
    analyst.context.close()

    sign_in(page, site, "dave")
    page.get_by_role("link", name="SLAs").click()
    invalid = page.request.post(f"{site.url}/sla", form={"csrf": csrf_token(page), "decision": decision, "minutes": "0"})
    assert invalid.status == 400 and "an SLA is from 1 to 10080 minutes" in invalid.text()
    page.get_by_label(f"{decision.capitalize()} SLA (minutes)").fill("60")
    page.get_by_role("button", name=f"Save {decision} SLA").click()
    expect(page.get_by_role("status")).to_have_text("SLA changed: the queue is re-ranked and counted against it.")
    expect(page.get_by_role("table", name="SLAs")).to_contain_text("1 h 00 min")
    page.screenshot(path=str(DOCS / "console-sla.png"))
    assert site.sql("SELECT actor, before, after FROM console_audit WHERE action = 'sla_changed'") == [
        ("dave", {"sla_minutes": 240}, {"sla_minutes": 60})
    ]

    page.goto(f"{site.url}/?decision={decision}")
    first = page.get_by_role("table", name="Cases").locator("tbody tr").first
    expect(first).to_contain_text(case)
    expect(first).to_contain_text("breached")
    expect(page.get_by_role("list", name="Cases per state")).to_contain_text("past the 1 h 00 min SLA")
    text = ""

    def exported() -> bool:  # the housekeeping's next pass exports the queue's new SLA beside its oldest case
        nonlocal text
        text = httpx.get(site.metrics_url, timeout=5).text
        return sample(f'fraudd_console_sla_seconds{{decision="{decision}"}}', text) == 3600

    wait_for(exported, 15, message="the SLA gauge")
    assert sample(f'fraudd_console_oldest_open_case_age_seconds{{decision="{decision}"}}', text) > 3600

    page.goto(f"{site.url}/sla")
    page.get_by_label(f"{decision.capitalize()} SLA (minutes)").fill("240")
    page.get_by_role("button", name=f"Save {decision} SLA").click()
    expect(page.get_by_role("status")).to_contain_text("SLA changed")
    page.goto(f"{site.url}/?decision={decision}")
    expect(page.get_by_role("table", name="Cases").locator("tr", has_text=case)).not_to_contain_text("breached")


def test_an_admin_adds_disables_and_keeps_the_last_admin(site: Site, browser: Browser, page: Page) -> None:
    password = "frank's own passphrase"
    sign_in(page, site, "root")
    page.get_by_role("link", name="Users").click()
    page.get_by_label("Username", exact=True).fill("frank")
    page.get_by_label("Role", exact=True).select_option("analyst")
    page.get_by_label("Initial password").fill(password)
    page.get_by_label("Repeat the password").fill(password + "!")
    page.get_by_role("button", name="Add user").click()
    expect(page.get_by_role("status")).to_have_text("The two passwords differ.")
    page.get_by_label("Initial password").fill(password)
    page.get_by_label("Repeat the password").fill(password)
    page.get_by_role("button", name="Add user").click()
    expect(page.get_by_role("status")).to_have_text("User added.")
    assert password.split()[0] not in page.url
    assert site.sql("SELECT role, disabled, password_hash LIKE 'scrypt$%%' FROM console_users WHERE username = 'frank'") == [
        ("analyst", False, True)
    ]

    frank = second_page(browser)
    sign_in(frank, site, "frank", password)
    page.get_by_role("button", name="Disable frank").click()
    expect(page.get_by_role("status")).to_have_text("User disabled: their sessions ended.")
    frank.reload()
    frank.wait_for_url("**/login?expired=1")
    frank.get_by_label("Username").fill("frank")
    frank.get_by_label("Password").fill(password)
    frank.get_by_role("button", name="Sign in").click()
    expect(frank.get_by_role("status")).to_have_text("Wrong username or password.")
    frank.context.close()

    # root is the only active admin: neither their demotion nor their disabling is made.
    page.get_by_label("Role of root", exact=True).select_option("lead")
    page.get_by_role("button", name="Set role of root").click()
    expect(page.get_by_role("status")).to_have_text("Not changed: root is the last active admin: make another user admin first.")
    page.get_by_role("button", name="Disable root").click()
    expect(page.get_by_role("status")).to_contain_text("root is the last active admin")
    assert site.sql("SELECT role, disabled FROM console_users WHERE username = 'root'") == [("admin", False)]
    page.goto(f"{site.url}/users")
    page.screenshot(path=str(DOCS / "console-users.png"), full_page=True)
    changes = site.sql("SELECT action, before, after FROM console_audit WHERE actor = 'root' AND subject = 'frank' ORDER BY id")
    assert changes == [
        ("user_added", None, {"role": "analyst", "disabled": False}),
        ("user_disabled", {"role": "analyst", "disabled": False}, {"role": "analyst", "disabled": True}),
    ]
    assert site.sql("SELECT count(*) FROM console_audit WHERE position(%s in concat(before, after)) > 0", (password,)) == [(0,)]

    lead = second_page(browser)
    sign_in(lead, site, "dave")
    form = {"csrf": csrf_token(lead), "username": "mallory", "role": "admin", "password": password, "password_again": password}
    assert lead.request.post(f"{site.url}/users", form=form).status == 403
    assert (
        lead.request.post(f"{site.url}/users/dave", form={"csrf": csrf_token(lead), "action": "role", "role": "admin"}).status
        == 403
    )
    assert site.sql(
        "SELECT subject FROM console_audit WHERE actor = 'dave' AND action = 'forbidden' AND subject LIKE 'POST /users%%'"
        " ORDER BY id"
    ) == [
        ("POST /users",),
        ("POST /users/dave",),
    ]
    assert site.sql("SELECT username, role FROM console_users WHERE username IN ('mallory', 'dave')") == [("dave", "lead")]
    lead.context.close()


def test_under_tls_the_session_cookie_is_secure(ns: Namespace, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=127.0.0.1"],
        check=True,
        capture_output=True,
    )
    (tmp_path / "password").write_text(PASSWORD + "\n")
    assert ns.fraudd("users", "add", "tina", "--role", "analyst", "--password-file", str(tmp_path / "password")).returncode == 0
    port = free_port()
    console = ns.start_command(
        "console", "--listen", f"127.0.0.1:{port}", "--workers", "1", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    try:
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=False, headers={"Accept": "text/html"}, timeout=5) as http:
            wait_for(lambda: _answers(http), 30, message="the console answering over TLS")
            token = re.search(r'name="csrf" value="([^"]+)"', http.get("/login").text).group(1)
            signed_in = http.post("/login", data={"username": "tina", "password": PASSWORD, "csrf": token})
        cookie = next(
            value for name, value in signed_in.headers.multi_items() if name == "set-cookie" and "fraudd_session" in value
        )
        assert signed_in.status_code == 303 and "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=3)
    finally:
        code, log = console.stop()
        assert code == 0, log[-2000:]


def _answers(http: httpx.Client) -> bool:
    try:
        return http.get("/login").status_code == 200
    except httpx.TransportError:
        return False
