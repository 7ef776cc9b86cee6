// A waiting page checks again by itself, in the background, so the page and the person's focus stay put. It moves on
// only when something changed. Without JavaScript the "Check now" button does the same check.
(function () {
  var status = document.getElementById("wait-status");
  if (!status || !window.fetch) return;
  var url = status.getAttribute("data-poll-url");
  var seconds = Math.max(1, parseInt(status.getAttribute("data-poll-seconds"), 10) || 3);
  var auto = status.getAttribute("data-auto-text");
  if (auto) status.textContent = auto;

  function go(next) { window.location.assign(next || window.location.href); }

  function check() {
    fetch(url + "?format=json", { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) throw new Error("status " + response.status);
        return response.json();
      })
      .then(function (answer) {
        if (answer.waiting) window.setTimeout(check, seconds * 1000);
        else go(answer.url);
      })
      .catch(function () { go(); });  // show whatever the journey's page says now (an error page, for instance)
  }

  window.setTimeout(check, seconds * 1000);
})();
