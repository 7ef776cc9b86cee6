// Move focus to the error summary so screen readers announce it and keyboard users start from it.
(function () {
  var summary = document.getElementById("error-summary");
  if (summary) summary.focus();
})();
