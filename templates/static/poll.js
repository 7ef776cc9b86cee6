// Waiting pages check again by themselves; without JavaScript the "Check now" button does the same.
(function () {
  var status = document.getElementById("wait-status");
  if (!status) return;
  var seconds = Math.max(1, parseInt(status.getAttribute("data-poll-seconds"), 10) || 3);
  setTimeout(function () { window.location.replace(status.getAttribute("data-poll-url")); }, seconds * 1000);
})();
