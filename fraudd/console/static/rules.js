// fraudd console, new draft: the rules text is checked as one types, by the parser `fraudd rules import` uses.
"use strict";

(function () {
  const editor = document.querySelector("textarea[data-validate]");
  const verdict = document.getElementById("validation");
  if (!editor || !verdict) return;
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
  let timer = null;
  let sent = 0;

  async function check() {
    const asked = ++sent;
    let answer;
    try {
      answer = await fetch(editor.dataset.validate, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ source: editor.value }),
      });
    } catch {
      return; // the console is unreachable: Save draft still checks on the server
    }
    if (asked !== sent || !answer.ok) return; // a later keystroke's answer will follow
    const result = await answer.json();
    verdict.textContent = result.message;
    verdict.classList.toggle("invalid", !result.ok);
    editor.setAttribute("aria-invalid", result.ok ? "false" : "true");
  }

  editor.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(check, 300);
  });
  check();
})();
