/* moescope report guard: records script errors, console errors and blocked (non-embedded) resource loads as
   attributes of the root element, so a headless browser's --dump-dom shows them. Runs first, in <head>. */
(function () {
  'use strict';
  var root = document.documentElement;
  function record(attr, message) {
    var old = root.getAttribute(attr);
    root.setAttribute(attr, (old ? old + ' | ' : '') + String(message).slice(0, 300));
  }
  window.moescopeRecordError = function (message) { record('data-js-errors', message); };
  window.addEventListener('error', function (e) {
    record('data-js-errors', e.message || ('failed to load ' + ((e.target && (e.target.src || e.target.href)) || '?')));
  }, true);
  window.addEventListener('unhandledrejection', function (e) { record('data-js-errors', 'unhandled rejection: ' + e.reason); });
  document.addEventListener('securitypolicyviolation', function (e) {
    record('data-csp-violations', e.violatedDirective + ' ' + e.blockedURI);
  });
  if (window.console && console.error) {
    var original = console.error;
    console.error = function () {
      record('data-js-errors', Array.prototype.join.call(arguments, ' '));
      return original.apply(console, arguments);
    };
  }
})();
