/* letta-bus console: signing in from a portal link, buttons and forms that call the JSON API, live updates.
   No framework, no inline handlers (the pages' Content-Security-Policy allows only this file). Everything shown
   from a response goes through textContent; HTML fragments come only from the console's own escaped templates. */
(function () {
  "use strict";
  var HEADERS = {"Content-Type": "application/json", "X-Requested-With": "letta-bus-console"};
  var MAX_ROWS = 200;

  function call(method, url, body) {
    var init = {method: method, headers: HEADERS, credentials: "same-origin"};
    if (body !== undefined) { init.body = JSON.stringify(body); }
    return fetch(url, init).then(function (r) {
      return r.json().catch(function () { return null; }).then(function (data) {
        if (r.status === 401 && !(data && data.next)) { location.assign("/console/signed-out?reason=expired"); }
        return {ok: r.ok, status: r.status, data: data};
      });
    });
  }

  function problem(res) {
    var d = res.data && res.data.detail;
    if (Array.isArray(d)) {
      return d.map(function (e) { return (e.loc || []).slice(1).join(".") + ": " + e.msg; }).join("; ");
    }
    return "HTTP " + res.status + (d ? ": " + d : "");
  }

  var FORMATS = {
    secret: function (d) {
      return d && d.secret ? "Secret (shown once, copy it now): " + d.secret : "Done.";
    },
    test: function (d) {
      var text = d.status + (d.status_code ? ": HTTP " + d.status_code : "") +
        (d.duration_ms !== null && d.duration_ms !== undefined ? " in " + Math.round(d.duration_ms) + " ms" : "");
      return text + (d.error ? " (" + d.error + ")" : "") + (d.delivery_id ? " · delivery " + d.delivery_id : "");
    },
    json: function (d) { return d === null ? "Done." : JSON.stringify(d); }
  };

  function show(output, res, format) {
    if (!output) { return; }
    output.dataset.state = res.ok ? "ok" : "error";
    output.textContent = res.ok ? (FORMATS[format] || FORMATS.json)(res.data) : problem(res);
  }

  function asTime(value) {  /* datetime-local, read as UTC */
    return value.length === 16 ? value + ":00Z" : (/[zZ]|[+-]\d\d:\d\d$/.test(value) ? value : value + "Z");
  }

  function formBody(form) {
    var body = {};
    Array.prototype.forEach.call(form.elements, function (el) {
      if (!el.name) { return; }
      var kind = el.dataset.kind;
      if (kind === "bool") { body[el.name] = el.checked; return; }
      var value = el.value.trim();
      if (kind === "list") {
        body[el.name] = value ? value.split(/[\s,]+/).filter(Boolean) : [];
      } else if (value) {
        body[el.name] = kind === "time" ? asTime(value) : value;
      }
    });
    return body;
  }

  function outputOf(el) {
    var id = el.dataset.output;
    return id ? document.getElementById(id) : el.querySelector("output");
  }

  function run(el, method, url, body, output, format) {
    if (el.dataset.confirm && !window.confirm(el.dataset.confirm)) { return; }
    var control = el.tagName === "FORM" ? el.querySelector("button[type=submit]") : el;
    control.disabled = true;
    control.setAttribute("aria-busy", "true");
    if (output) { output.dataset.state = "busy"; output.textContent = "Working…"; }
    call(method, url, body).then(function (res) {
      show(output, res, format || (output && output.dataset.format));
      if (res.ok && el.dataset.done === "reload") { location.reload(); }
    }).catch(function (err) {
      if (output) { output.dataset.state = "error"; output.textContent = "Request failed: " + err; }
    }).finally(function () {
      control.disabled = false;
      control.removeAttribute("aria-busy");
    });
  }

  document.addEventListener("click", function (ev) {
    var button = ev.target.closest("button.api");
    if (!button) { return; }
    ev.preventDefault();
    run(button, button.dataset.method, button.dataset.action, undefined, outputOf(button), button.dataset.format);
  });

  document.addEventListener("submit", function (ev) {
    var form = ev.target.closest("form.api");
    if (!form) { return; }
    ev.preventDefault();
    run(form, form.dataset.method, form.dataset.action, formBody(form), outputOf(form), form.dataset.format);
  });

  function fromHtml(html) {
    var t = document.createElement("template");
    t.innerHTML = html.trim();
    return t.content.firstElementChild;
  }

  function onAttempt(target, data) {
    if (target.tagName === "TABLE") {
      var tbody = target.tBodies[0];
      var row = fromHtml(data.row);
      var old = tbody.querySelector('tr[data-delivery-id="' + CSS.escape(data.delivery_id) + '"]');
      if (old) { old.replaceWith(row); } else { tbody.prepend(row); }
      while (tbody.rows.length > MAX_ROWS) { tbody.deleteRow(-1); }
    } else {
      if (!target.querySelector('li[data-attempt-number="' + data.number + '"]')) {
        target.appendChild(fromHtml(data.item));
      }
      var status = document.getElementById("delivery-status");
      if (status) { status.textContent = data.status; status.className = "status status-" + data.status; }
    }
  }

  function live(target) {
    var status = document.getElementById("live-status");
    var say = function (text) { if (status) { status.textContent = text; } };
    var source = new EventSource(target.dataset.live);
    source.addEventListener("open", function () { say("Live: new attempts appear here."); });
    source.addEventListener("error", function () { say("Live updates interrupted; reconnecting…"); });
    source.addEventListener("lagged", function () { say("Some updates were skipped: reload the page."); });
    source.addEventListener("attempt", function (ev) { onAttempt(target, JSON.parse(ev.data)); });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  function login(section) {
    var say = document.getElementById("login-status");
    var token = new URLSearchParams(location.hash.slice(1)).get("token");
    history.replaceState(null, "", location.pathname + location.search);  /* the token leaves the address bar */
    if (!token) { location.replace("/console/endpoints"); return; }
    call("POST", section.dataset.login, {token: token}).then(function (res) {
      location.replace((res.data && res.data.next) || "/console/signed-out?reason=invalid");
    }).catch(function () { say.textContent = "Could not reach the server; reload the page to try again."; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var section = document.getElementById("login");
    if (section) { login(section); }
    document.querySelectorAll("[data-live]").forEach(live);
  });
})();
