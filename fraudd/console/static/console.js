// fraudd console: keyboard shortcuts, the queue's polling, the case lease's heartbeat. Plain JS, no build.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
  const help = document.getElementById("help");

  function typing(target) {
    return target.closest("input, textarea, select, [contenteditable]") !== null;
  }

  function rows() {
    return Array.from(document.querySelectorAll("a[data-row]"));
  }

  function move(step) {
    const all = rows();
    if (!all.length) return;
    const at = all.indexOf(document.activeElement);
    const next = at < 0 ? (step > 0 ? 0 : all.length - 1) : Math.min(all.length - 1, Math.max(0, at + step));
    all.forEach((row) => row.closest("tr").classList.remove("selected"));
    all[next].focus();
    all[next].closest("tr").classList.add("selected");
  }

  function click(selector) {
    const element = document.querySelector(selector);
    if (element) element.click();
  }

  document.querySelectorAll("[data-help]").forEach((button) => button.addEventListener("click", () => help?.showModal()));

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
    if (help?.open && event.key !== "?") return;
    const keys = {
      j: () => move(1),
      k: () => move(-1),
      c: () => document.querySelector('form[action="/claim"]')?.requestSubmit(),
      f: () => click("#verdict-fraud"),
      l: () => click("#verdict-legit"),
      n: () => document.getElementById("new-note")?.focus(),
      "?": () => (help?.open ? help.close() : help?.showModal()),
    };
    const action = keys[event.key];
    if (action) {
      event.preventDefault();
      action();
    }
  });

  // The queue: new cases appear without a reload (the table is fetched again when its counts change).
  const queue = document.getElementById("queue");
  if (queue && queue.dataset.poll) {
    setInterval(async () => {
      if (document.hidden || queue.contains(document.activeElement) && document.activeElement.matches("input")) return;
      const answer = await fetch(queue.dataset.poll, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!answer.ok) return;
      const html = await answer.text();
      const fresh = new DOMParser().parseFromString(html, "text/html");
      const before = queue.querySelector(".counts")?.textContent + queue.querySelector(".counts")?.dataset.newest;
      const after = fresh.querySelector(".counts")?.textContent + fresh.querySelector(".counts")?.dataset.newest;
      if (before !== after) {
        const selected = document.activeElement?.dataset?.row !== undefined ? document.activeElement.textContent : null;
        queue.replaceChildren(...fresh.body.childNodes);
        if (selected) rows().find((row) => row.textContent === selected)?.focus();
      }
    }, 10000);
  }

  // A case held by this analyst: keep the lease while they work (any key or click within the minute).
  const held = document.querySelector('[data-held="1"]');
  if (held) {
    let active = false;
    ["keydown", "click", "scroll"].forEach((name) => document.addEventListener(name, () => (active = true), { passive: true }));
    setInterval(() => {
      if (!active) return;
      active = false;
      fetch("/cases/" + encodeURIComponent(held.dataset.case) + "/renew", {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf },
      });
    }, 60000);
  }
})();
