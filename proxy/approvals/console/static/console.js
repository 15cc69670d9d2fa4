// The approvals console's one script: live pending approvals and answers, and the live decisions.
// Hosts, paths, methods and reasons come from sandboxes: every element here is built with
// createElement and filled with textContent, never parsed as HTML.
"use strict";

(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const CSRF = csrfMeta ? csrfMeta.getAttribute("content") : "";
  const MAX_DECISIONS = 500; // rows kept on the decisions page
  const MAX_BUFFERED = 5000; // decisions kept while paused

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) throw new Error("no event-handler attributes");
      if (key === "text") node.textContent = String(value);
      else if (key === "className") node.className = String(value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child); // strings become text nodes
    }
    return node;
  }

  function announce(text) {
    const region = document.getElementById("announce") || document.getElementById("buffered");
    if (region) region.textContent = text;
  }

  function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 120) return seconds + " s";
    if (seconds < 7200) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
    return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
  }

  function now() {
    return Date.now() / 1000;
  }

  // -- the event stream -------------------------------------------------------------------------

  function connect(path, handlers) {
    const state = document.getElementById("stream");
    const show = (name, text) => {
      if (!state) return;
      state.dataset.state = name;
      state.textContent = text;
    };
    const source = new EventSource(path);
    source.addEventListener("open", () => show("live", "Live."));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        show("closed", "Disconnected: the session ended or the gate stopped. ");
        state.append(el("a", { href: "/console/login", text: "Log in again" }));
      } else {
        show("connecting", "Reconnecting…");
      }
    });
    for (const [name, handle] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => handle(JSON.parse(event.data)));
    }
    return source;
  }

  // -- pending approvals ------------------------------------------------------------------------

  const rows = new Map(); // approval id -> {approval, item, age, left, form}

  function field(list, label, value, className) {
    if (value === null || value === undefined || value === "") return;
    list.append(el("dt", { text: label }), el("dd", { className: className || null, text: value }));
  }

  function approvalItem(a) {
    const title = el("h2", { id: "title-" + a.id, className: "what mono", text: a.what });
    const facts = el("dl", { className: "facts" });
    field(facts, "Sandbox", a.sandbox_id === "-" ? "- (no sandbox identities)" : a.sandbox_id, "mono");
    field(facts, "Client", a.client, "mono");
    // Filled in by gates that know them; older approvals have none of these.
    field(facts, "User", a.user);
    field(facts, "Task", a.task);
    field(facts, "Process", a.process, "mono");
    field(facts, "Host", a.host, "mono");
    field(facts, "Port", a.port === 0 ? null : a.port, "mono");
    field(facts, "Method", a.method, "mono");
    field(facts, "Path", a.path, "mono");
    // The query as decisions record it (names only unless values are recorded): a request with
    // another query is another approval.
    let query = a.query_id ? "?" + (a.query || "") : null;
    if (query !== null && Number.isInteger(a.query_bytes) && a.query_bytes !== (a.query || "").length) {
      query += " (" + a.query_bytes + " bytes sent; values not recorded)";
    }
    field(facts, "Query", query, "mono");
    // The header fields as sent: other fields are another approval (their values are not shown).
    field(facts, "Header fields", Number.isInteger(a.head_bytes) ? a.head_bytes + " bytes (not shown)" : null);
    // A body the gate held to decide the request, or one it did not read: another body is another
    // approval, and a body not read joins none.
    const unread = typeof a.body_id === "string" && a.body_id.startsWith("unread-");
    const size = Number.isInteger(a.body_bytes) ? a.body_bytes + " bytes" : "unknown length";
    field(facts, "Body", unread ? size + ", not read by the gate"
      : Number.isInteger(a.body_bytes) ? a.body_bytes + " bytes, held (not shown)" : null);
    // What a GraphQL request runs: each operation's type and root fields (never a name it chose).
    field(facts, "Runs", a.runs, "mono");
    field(facts, "Rule", a.rule ? a.rule + (a.review === "auto" ? " (reviewer may answer)" : "") : null, "mono");
    const age = el("dd", { className: "age" });
    const left = el("dd", { className: "left" });
    facts.append(el("dt", { text: "Waiting" }), age, el("dt", { text: "Time left" }), left);
    if (a.advice) field(facts, "Reviewer", a.advice + (a.advice_reason ? ": " + a.advice_reason : ""));

    const reason = el("input", {
      id: "reason-" + a.id, name: "reason", type: "text", maxlength: "500", autocomplete: "off",
      "aria-describedby": "hint-" + a.id,
    });
    const button = (scope, text, className) =>
      el("button", { type: "submit", name: "scope", value: scope, "data-answer": scope, className }, text);
    const result = el("p", { className: "result", role: "alert" });
    const form = el("form", { className: "answer", "data-id": a.id },
      el("label", { for: "reason-" + a.id, text: "Reason" }),
      reason,
      el("p", { id: "hint-" + a.id, className: "hint", text: "Optional to allow; needed to deny (the agent sees it)." }),
      el("div", { className: "buttons", role: "group", "aria-label": "Answer" },
        button("once", "Allow once", "allow"),
        button("session", "Allow for this sandbox's session", "allow"),
        button("persist", "Allow persistently", "allow"),
        button("deny", "Deny", "deny")),
      result);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const scope = event.submitter ? event.submitter.value : "once";
      submitAnswer(a, form, scope, reason, result);
    });
    const item = el("li", { id: "approval-" + a.id, className: "approval", "aria-labelledby": title.id },
      title, facts, form);
    return { approval: a, item, age, left, form };
  }

  async function submitAnswer(a, form, scope, reason, result) {
    const text = reason.value.trim();
    if (scope === "deny" && !text) {
      result.textContent = "Say why: the agent sees the reason.";
      reason.setAttribute("aria-invalid", "true");
      reason.focus();
      return;
    }
    reason.removeAttribute("aria-invalid");
    const verb = scope === "deny" ? "deny" : "approve";
    const body = scope === "deny" ? {} : { scope };
    if (text) body.reason = text;
    for (const b of form.querySelectorAll("button")) b.disabled = true;
    result.textContent = "Sending…";
    let response;
    let data = {};
    try {
      response = await fetch("/console/approvals/" + encodeURIComponent(a.id) + "/" + verb, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF },
        body: JSON.stringify(body),
        credentials: "same-origin",
        cache: "no-store",
      });
      data = await response.json().catch(() => ({}));
    } catch (err) {
      result.textContent = "Could not reach the gate; nothing was answered.";
      for (const b of form.querySelectorAll("button")) b.disabled = false;
      return;
    }
    if (response.ok) {
      const done = data.approval;
      result.textContent = done.state === "approved"
        ? "Allowed (" + done.scope + ") by " + done.decided_by + "."
        : "Denied by " + done.decided_by + ".";
      announce(result.textContent + " " + a.what);
      return;
    }
    if (response.status === 409 && data.approval) {
      result.textContent = "Already " + data.approval.state +
        (data.approval.decided_by ? " by " + data.approval.decided_by : "") + ".";
      return;
    }
    if (response.status === 401) {
      result.textContent = "Your session ended: log in again. Nothing was answered.";
      return;
    }
    result.textContent = (data.error || "The gate refused the answer") + ".";
    for (const b of form.querySelectorAll("button")) b.disabled = false;
  }

  function upsert(a, isNew) {
    const known = rows.get(a.id);
    if (known) {
      // An update (e.g. the reviewer's advice): rebuild the facts, keep what the person typed.
      const fresh = approvalItem(a);
      known.item.replaceChild(fresh.item.querySelector("dl"), known.item.querySelector("dl"));
      known.approval = a;
      known.age = fresh.age;
      known.left = fresh.left;
    } else {
      const row = approvalItem(a);
      rows.set(a.id, row);
      document.getElementById("approvals").append(row.item);
      if (isNew) announce("New approval: " + a.what + " from sandbox " + a.sandbox_id + ".");
    }
    tick();
    updateEmpty();
  }

  function removeRow(id, decided) {
    const row = rows.get(id);
    if (!row) return;
    rows.delete(id);
    const hadFocus = row.item.contains(document.activeElement);
    const next = row.item.nextElementSibling || row.item.previousElementSibling;
    row.item.remove();
    if (decided) {
      const by = decided.decided_by ? " by " + decided.decided_by : "";
      announce(decided.what + ": " + decided.state + by + ".");
    }
    if (hadFocus) {
      const target = next ? next.querySelector("input") : document.getElementById("main");
      if (target) target.focus();
    }
    updateEmpty();
  }

  function updateEmpty() {
    const empty = document.getElementById("empty");
    if (empty) empty.hidden = rows.size > 0;
  }

  function tick() {
    const t = now();
    for (const row of rows.values()) {
      row.age.textContent = duration(t - row.approval.created);
      const left = row.approval.deadline - t;
      row.left.textContent = left > 0 ? duration(left) : "expired";
      row.left.classList.toggle("urgent", left < 15);
    }
  }

  function pendingPage() {
    connect("/console/events", {
      snapshot(data) {
        const ids = new Set(data.approvals.map((a) => a.id));
        for (const id of [...rows.keys()]) if (!ids.has(id)) removeRow(id, null);
        for (const a of data.approvals) upsert(a, false);
        updateEmpty();
      },
      approval(data) {
        const a = data.approval;
        if (a.state === "pending") upsert(a, data.change === "pending");
        else removeRow(a.id, a);
      },
    });
    setInterval(tick, 1000);
  }

  // -- live decisions ---------------------------------------------------------------------------

  const decisions = []; // newest first, at most MAX_DECISIONS
  let paused = false;
  let buffered = [];
  let dropped = 0;

  function filters() {
    const form = document.getElementById("filters");
    const value = (name) => form.elements[name].value.trim().toLowerCase();
    return { sandbox: value("sandbox"), decision: value("decision"), reason: value("reason"), host: value("host") };
  }

  function matches(d, f) {
    const has = (text, part) => !part || String(text || "").toLowerCase().includes(part);
    return has(d.sandbox_id || "-", f.sandbox) && (!f.decision || d.decision === f.decision) &&
      has(d.reason, f.reason) && has(d.host, f.host);
  }

  function decisionRow(d) {
    const time = new Date((d.ts || now()) * 1000).toLocaleTimeString([], { hour12: false });
    const host = String(d.host || "");
    let request = d.port ? (host.includes(":") ? "[" + host + "]" : host) + ":" + d.port : host;
    if (d.path) request += d.path;
    if (d.query) request += "?" + d.query;
    if (d.method) request = d.method + " " + request;
    if (d.qtype) request += " (" + d.qtype + ")";
    return el("tr", { className: "decision-" + d.decision },
      el("td", { className: "mono", text: time }),
      el("td", { className: "mono", text: d.sandbox_id || "-" }),
      el("td", {}, el("span", { className: "action action-" + d.decision, text: d.decision })),
      el("td", { text: d.reason }),
      el("td", { text: d.kind }),
      el("td", { className: "mono request", text: request }),
      el("td", { className: "mono", text: d.rule || "" }),
      el("td", { text: d.decided_by ? d.decided_by + (d.grant ? " (" + d.grant + ")" : "") : "" }));
  }

  function render() {
    const body = document.getElementById("decisions");
    const f = filters();
    body.replaceChildren(...decisions.filter((d) => matches(d, f)).map(decisionRow));
    document.getElementById("no-decisions").hidden = decisions.length > 0;
  }

  function add(d) {
    decisions.unshift(d);
    if (decisions.length > MAX_DECISIONS) decisions.pop();
    const body = document.getElementById("decisions");
    if (matches(d, filters())) body.prepend(decisionRow(d));
    while (body.rows.length > MAX_DECISIONS) body.deleteRow(-1);
    document.getElementById("no-decisions").hidden = true;
  }

  function showBuffered() {
    const info = document.getElementById("buffered");
    if (!paused) info.textContent = "";
    else info.textContent = "Paused: " + buffered.length + " new" + (dropped ? ", " + dropped + " oldest dropped" : "") + ".";
  }

  function decisionsPage() {
    const pause = document.getElementById("pause");
    pause.addEventListener("click", () => {
      paused = !paused;
      pause.setAttribute("aria-pressed", String(paused));
      pause.textContent = paused ? "Resume" : "Pause";
      if (!paused) {
        const count = buffered.length;
        for (const d of buffered) add(d);
        buffered = [];
        dropped = 0;
        showBuffered();
        document.getElementById("buffered").textContent = "Resumed: " + count + " added.";
      } else {
        showBuffered();
      }
    });
    const form = document.getElementById("filters");
    form.addEventListener("input", render);
    form.addEventListener("submit", (event) => event.preventDefault());
    connect("/console/events?decisions=1", {
      decision(d) {
        if (!paused) return add(d);
        buffered.push(d);
        if (buffered.length > MAX_BUFFERED) {
          buffered.shift();
          dropped += 1;
        }
        showBuffered();
      },
    });
    render();
  }

  const page = document.body.dataset.page;
  if (page === "pending") pendingPage();
  else if (page === "decisions") decisionsPage();
})();
