// dirq console: a single page over the JSON API under /api/v1.
//
// Rules this file keeps, so that the page is safe under the server's Content-Security-Policy
// and against whatever a message or a queue name contains:
// - server data reaches the page only through textContent, setAttribute on non-script
//   attributes, and SVG geometry; never through HTML parsing;
// - no inline handlers, no eval, no inline style attributes (classes only);
// - every request is same-origin; the token travels only in the Authorization header.
"use strict";

(function () {
  const API = "/api/v1";
  const POLL_MS = 2000;
  const PAGE = 100;
  const BODY_LIMIT = 64 * 1024;
  const TOKEN_KEY = "dirq-token";
  const SVG_NS = "http://www.w3.org/2000/svg";

  // Which actions make sense for a message in each state; the server has the last word.
  const ACTIONS = {
    incoming: ["hold", "delete"],
    pending: ["cancel"],
    errors: ["requeue", "delete"],
    deferred: ["flush", "hold", "delete"],
    hold: ["release", "delete"],
    chained: ["delete"],
  };
  const ACTION_DONE = {
    hold: "held", release: "released", requeue: "requeued",
    delete: "deleted", flush: "flushed", cancel: "cancelled",
  };
  const MAIN_STATES = ["incoming", "pending", "errors", "deferred", "hold", "chained"];

  const view = {
    route: { page: "overview" },
    readOnly: null,
    lost: false,
    timer: null,
    generation: 0, // bumped on navigation so a late body for an old page is dropped
    pollSeq: 0,
    offset: 0,
    lastOverview: "",
    lastQueue: "",
    lastMessages: "",
    lastAges: "",
    pending: null, // the action waiting for confirmation
  };

  const $ = (id) => document.getElementById(id);

  // ----- DOM helpers -----

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      node.setAttribute(key, value === true ? "" : String(value));
    }
  }

  function append(node, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  // Replaces a container's content and gives focus back to the equivalent control, so a
  // keyboard user does not lose their place when a poll redraws a table.
  function replaceKeepingFocus(container, nodes) {
    const active = document.activeElement;
    let selector = null;
    if (active && container.contains(active)) {
      if (active.dataset.action) selector = '[data-action="' + CSS.escape(active.dataset.action) + '"][data-id="' + CSS.escape(active.dataset.id) + '"]';
      else if (active.dataset.view) selector = '[data-view="' + CSS.escape(active.dataset.view) + '"]';
      else if (active.getAttribute("href")) selector = 'a[href="' + CSS.escape(active.getAttribute("href")) + '"]';
    }
    container.replaceChildren(...nodes);
    if (selector) {
      const again = container.querySelector(selector);
      if (again) again.focus();
    }
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  // ----- formatting -----

  function fmtCount(n) {
    return typeof n === "number" ? n.toLocaleString("en") : "—";
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  function fmtAge(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "—";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function fmtRate(r) {
    return typeof r === "number" ? (r < 10 ? r.toFixed(2) : r.toFixed(0)) + "/s" : "—";
  }

  // A due time may come as unix seconds or as an RFC 3339 string.
  function fmtDue(due) {
    if (due === null || due === undefined || due === "") return "—";
    const date = typeof due === "number" ? new Date(due * 1000) : new Date(due);
    if (isNaN(date.getTime())) return String(due);
    const delta = (date.getTime() - Date.now()) / 1000;
    const rel = delta >= 0 ? "in " + fmtAge(delta) : fmtAge(-delta) + " ago";
    return date.toLocaleString() + " (" + rel + ")";
  }

  function capitalised(s) {
    return s.charAt(0).toUpperCase() + s.slice(1);
  }

  function text(value) {
    if (value === null || value === undefined || value === "") return "—";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  // ----- HTTP -----

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // The server's own message for a failed request ({"error": "..."}), or the status line.
  async function errorOf(response) {
    let detail = "";
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") detail = body.error;
    } catch (_) {
      // not JSON: fall back to the status
    }
    const status = response.status + (response.statusText ? " " + response.statusText : "");
    return new ApiError(response.status, detail ? detail + " (" + status + ")" : status);
  }

  async function request(path, options) {
    let response;
    try {
      response = await fetch(path, Object.assign({ cache: "no-store", credentials: "same-origin" }, options));
    } catch (err) {
      throw new ApiError(0, "no answer from the server");
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async function getJSON(path) {
    const response = await request(path, { headers: { Accept: "application/json" } });
    return response.json();
  }

  function queuePath(name) {
    return API + "/queues/" + encodeURIComponent(name);
  }

  // ----- connection state -----

  function connected() {
    if (view.lost) {
      view.lost = false;
      show($("lost"), false);
    }
    $("status").textContent = "live";
    $("status").className = "status live";
    $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
  }

  function lostServer(err) {
    view.lost = true;
    $("lost-reason").textContent = err.message;
    show($("lost"), true);
    $("status").textContent = "disconnected";
    $("status").className = "status down";
  }

  // Lost means no answer, or a proxy in front saying the server is gone.
  function isLost(err) {
    return !(err instanceof ApiError) || err.status === 0 || err.status === 502 ||
      err.status === 503 || err.status === 504;
  }

  function setReadOnly(readOnly) {
    if (typeof readOnly !== "boolean" || readOnly === view.readOnly) return;
    view.readOnly = readOnly;
    const mode = $("mode");
    mode.textContent = readOnly ? "read-only" : "actions need a token";
    mode.className = "mode " + (readOnly ? "ro" : "rw");
    show(mode, true);
    document.body.classList.toggle("read-only", readOnly);
  }

  function updateTokenButton() {
    show($("forget-token"), !!sessionStorage.getItem(TOKEN_KEY));
  }

  // ----- charts -----

  // A small line chart of the per-second rates (or, when the samples carry only counts, of
  // the backlog) over the samples the server keeps.
  function sparkline(series, opts) {
    const width = (opts && opts.width) || 160;
    const height = (opts && opts.height) || 36;
    const samples = Array.isArray(series) ? series.filter((s) => s && typeof s.t === "number") : [];
    const lines = seriesLines(samples);
    const root = svg("svg", {
      class: "spark", width, height, viewBox: "0 0 " + width + " " + height,
      role: "img", "aria-label": lines.label,
    });
    root.append(svg("title", {}, lines.label));
    if (samples.length < 2) {
      root.append(svg("text", { x: 4, y: height / 2 + 4, class: "chart-empty" }, "collecting…"));
      return root;
    }
    const t0 = samples[0].t;
    const t1 = samples[samples.length - 1].t;
    const max = Math.max(1e-9, ...lines.sets.flatMap((set) => set.values));
    const axes = !!(opts && opts.axes);
    const left = axes ? 30 : 1;
    const bottom = axes ? 16 : 2;
    const top = axes ? 8 : 2;
    const x = (t) => (t1 === t0 ? left : ((t - t0) / (t1 - t0)) * (width - left - 2) + left);
    const y = (v) => height - bottom - (v / max) * (height - bottom - top);
    if (axes) {
      root.append(svg("line", { x1: left, y1: height - bottom, x2: width - 2, y2: height - bottom, class: "axis" }));
      root.append(svg("text", { x: left - 4, y: top + 4, class: "tick end" }, fmtNumber(max)));
      root.append(svg("text", { x: left - 4, y: height - bottom, class: "tick end" }, "0"));
      root.append(svg("text", { x: left, y: height - 3, class: "tick" }, "−" + fmtAge(t1 - t0)));
      root.append(svg("text", { x: width - 2, y: height - 3, class: "tick end" }, "now"));
    }
    for (const set of lines.sets) {
      const points = samples.map((s, i) => x(s.t).toFixed(1) + "," + y(set.values[i]).toFixed(1));
      root.append(svg("polyline", { points: points.join(" "), class: "line " + set.cls }));
    }
    return root;
  }

  function fmtNumber(n) {
    return Number.isInteger(n) ? String(n) : n < 10 ? n.toFixed(1) : n.toFixed(0);
  }

  function seriesLines(samples) {
    const rate = (s, key) => {
      const r = s.rates || s;
      return typeof r[key] === "number" ? r[key] : null;
    };
    if (samples.length && rate(samples[0], "enqueued_per_second") !== null) {
      return {
        label: "enqueued (blue) and finished (green) per second, last minutes",
        sets: [
          { cls: "in", values: samples.map((s) => rate(s, "enqueued_per_second") || 0) },
          { cls: "out", values: samples.map((s) => rate(s, "finished_per_second") || 0) },
        ],
      };
    }
    // Counts only: derive arrivals and departures would be guesswork, so draw the backlog
    // (everything waiting) and the errors.
    const count = (s, states) => states.reduce((sum, k) => sum + ((s.counts || {})[k] || 0), 0);
    return {
      label: "messages waiting (blue) and in errors (red), last minutes",
      sets: [
        { cls: "in", values: samples.map((s) => count(s, ["incoming", "pending", "deferred", "chained"])) },
        { cls: "err", values: samples.map((s) => count(s, ["errors"])) },
      ],
    };
  }

  // The age histogram: one stacked bar per age bucket, a colour per state.
  function histogram(hist) {
    const width = 420;
    const height = 170;
    const left = 34;
    const bottom = 34;
    const root = svg("svg", {
      class: "hist", width, height, viewBox: "0 0 " + width + " " + height,
      role: "img", "aria-label": "messages by age and state",
    });
    if (!hist.buckets.length) {
      root.append(svg("text", { x: 8, y: 20, class: "chart-empty" }, "no data"));
      return root;
    }
    const totals = hist.buckets.map((_, i) => hist.states.reduce((s, st) => s + (st.counts[i] || 0), 0));
    const max = Math.max(1, ...totals);
    const slot = (width - left - 4) / hist.buckets.length;
    // A bucket with a few messages next to one with many still shows: at least 2 px.
    const barH = (v) => Math.max(2, (v / max) * (height - bottom - 18));
    root.append(svg("line", { x1: left, y1: height - bottom, x2: width - 2, y2: height - bottom, class: "axis" }));
    root.append(svg("text", { x: left - 4, y: 22, class: "tick end" }, String(max)));
    root.append(svg("text", { x: left - 4, y: height - bottom, class: "tick end" }, "0"));
    hist.buckets.forEach((label, i) => {
      let yTop = height - bottom;
      const x0 = left + i * slot + slot * 0.15;
      for (const st of hist.states) {
        const v = st.counts[i] || 0;
        if (!v) continue;
        const h = barH(v);
        yTop -= h;
        const rect = svg("rect", {
          x: x0.toFixed(1), y: yTop.toFixed(1), width: (slot * 0.7).toFixed(1), height: h.toFixed(1),
          class: "bar state-" + cssToken(st.name),
        });
        rect.append(svg("title", {}, st.name + ", " + label + ": " + v));
        root.append(rect);
      }
      if (totals[i]) {
        root.append(svg("text", { x: (x0 + slot * 0.35).toFixed(1), y: (yTop - 3).toFixed(1), class: "tick mid" }, String(totals[i])));
      }
      root.append(svg("text", {
        x: (left + i * slot + slot / 2).toFixed(1), y: height - bottom + 14, class: "tick mid",
      }, label));
    });
    root.append(svg("text", { x: (left + width) / 2, y: height - 4, class: "tick mid" }, "age"));
    const legend = el("ul", { class: "legend" }, hist.states.map((st) =>
      el("li", {}, el("span", { class: "swatch state-" + cssToken(st.name), "aria-hidden": "true" }), st.name)));
    return el("div", {}, root, legend);
  }

  function cssToken(name) {
    return String(name).toLowerCase().replace(/[^a-z0-9_-]/g, "_");
  }

  function ageLabel(seconds) {
    if (seconds < 3600) return Math.round(seconds / 60) + "m";
    if (seconds < 86400) return Math.round(seconds / 3600) + "h";
    return Math.round(seconds / 86400) + "d";
  }

  // Turns the server's /ages answer into { buckets: [label], states: [{name, counts}] }.
  // Shapes understood: bucket limits in minutes or seconds with counts per state, or a list of
  // buckets each with its limit and counts.
  function parseAges(data) {
    const out = { buckets: [], states: [] };
    if (!data || typeof data !== "object") return out;
    const limitsMin = data.bucket_minutes || data.buckets_minutes || data.limits_minutes;
    const limitsSec = data.bucket_seconds || data.buckets_seconds || data.limits_seconds;
    const limits = Array.isArray(limitsSec) ? limitsSec : Array.isArray(limitsMin) ? limitsMin.map((m) => m * 60) : null;
    const perState = data.states || data.counts;
    if (limits && perState && typeof perState === "object") {
      const n = limits.length + 1;
      out.buckets = limits.map((s) => "<" + ageLabel(s)).concat([ageLabel(limits[limits.length - 1]) + "+"]);
      // Per state either an array of counts or { total, counts: [...] }.
      out.states = Object.entries(perState)
        .map(([name, v]) => ({ name, counts: Array.isArray(v) ? v : v && Array.isArray(v.counts) ? v.counts : null }))
        .filter((st) => st.counts)
        .map((st) => ({ name: st.name, counts: st.counts.slice(0, n) }));
      const order = (name) => (MAIN_STATES.indexOf(name) + 1 || 99);
      out.states.sort((a, b) => order(a.name) - order(b.name));
      return out;
    }
    if (Array.isArray(data.buckets)) {
      const names = new Set();
      for (const b of data.buckets) {
        if (b && b.counts && typeof b.counts === "object") Object.keys(b.counts).forEach((k) => names.add(k));
      }
      const single = names.size === 0;
      out.buckets = data.buckets.map((b) => {
        const limit = b.le_seconds ?? b.max_seconds ?? b.upper_seconds ??
          (typeof b.le_minutes === "number" ? b.le_minutes * 60 : null);
        if (typeof b.label === "string") return b.label;
        return typeof limit === "number" ? "<" + ageLabel(limit) : "older";
      });
      out.states = single
        ? [{ name: "messages", counts: data.buckets.map((b) => b.count || 0) }]
        : [...names].map((name) => ({ name, counts: data.buckets.map((b) => (b.counts || {})[name] || 0) }));
    }
    return out;
  }

  // ----- overview -----

  function stateColumns(queues) {
    const seen = [];
    for (const q of queues) {
      for (const k of Object.keys(q.counts || {})) {
        if (k !== "tmp" && !seen.includes(k)) seen.push(k);
      }
    }
    const known = MAIN_STATES.filter((s) => seen.includes(s));
    return known.concat(seen.filter((s) => !known.includes(s)));
  }

  function renderOverview(data) {
    const key = JSON.stringify(data);
    if (key === view.lastOverview) return;
    view.lastOverview = key;
    const queues = Array.isArray(data.queues) ? data.queues : [];
    const states = stateColumns(queues);
    const head = el("tr", {},
      el("th", { scope: "col" }, "Queue"),
      states.map((s) => el("th", { scope: "col", class: "num" }, s)),
      el("th", { scope: "col", class: "num" }, "Bytes"),
      el("th", { scope: "col", class: "num" }, "Oldest"),
      el("th", { scope: "col", title: "chart: messages waiting (blue) and in errors (red); figures: enqueued and finished per second now" }, "Last minutes · rates"),
      el("th", { scope: "col" }, "Health"),
      el("th", { scope: "col" }, "Pipers"));
    $("queues").tHead.replaceChildren(head);
    const rows = queues.map((q) => el("tr", { "data-queue": q.name },
      el("th", { scope: "row" }, el("a", { href: "#/queue/" + encodeURIComponent(q.name) }, q.name)),
      states.map((s) => {
        const n = (q.counts || {})[s];
        return el("td", { class: "num" + (s === "errors" && n > 0 ? " bad" : ""), "data-state": s }, fmtCount(n || 0));
      }),
      el("td", { class: "num" }, fmtBytes(q.bytes)),
      el("td", { class: "num" }, fmtAge(q.oldest_age_seconds)),
      el("td", { class: "rates" }, sparkline(q.series), rateText(q.rates)),
      el("td", {}, health(q)),
      el("td", {}, pipersList(q.pipers))));
    replaceKeepingFocus($("queues-body"), rows);
    show($("overview-empty"), queues.length === 0);
  }

  function rateText(rates) {
    const r = rates || {};
    return el("span", { class: "rate-text" },
      el("span", { class: "in", title: "enqueued per second" }, "↓ " + fmtRate(r.enqueued_per_second)),
      " ",
      el("span", { class: "out", title: "finished per second" }, "↑ " + fmtRate(r.finished_per_second)));
  }

  function badge(label, cls, title) {
    return el("span", { class: "badge " + cls, title: title || null }, label);
  }

  function health(q) {
    const badges = [];
    if (q.backpressure === true) badges.push(badge("backpressure", "warn", "producers are being slowed down"));
    for (const p of q.pipers || []) {
      if (p.breaker && !/^closed$/i.test(String(p.breaker))) {
        badges.push(badge("breaker " + text(p.breaker), "bad", "circuit breaker of Piper " + text(p.name)));
      }
    }
    if (!badges.length) badges.push(q.backpressure === null || q.backpressure === undefined
      ? badge("ok", "muted-badge", "no backpressure information")
      : badge("ok", "good"));
    return badges;
  }

  function pipersList(pipers) {
    if (!Array.isArray(pipers) || !pipers.length) return el("span", { class: "muted" }, "none");
    return el("ul", { class: "pipers" }, pipers.map((p) => el("li", {},
      el("span", { class: "dot " + (p.alive ? "alive" : "dead"), "aria-hidden": "true" }),
      el("span", { class: "visually-hidden" }, p.alive ? "alive: " : "not alive: "),
      text(p.name),
      el("span", { class: "muted" }, " · " + fmtAge(p.heartbeat_age_seconds)))));
  }

  // ----- a queue's page -----

  function renderQueue(q) {
    const key = JSON.stringify(q);
    if (key === view.lastQueue) return;
    view.lastQueue = key;
    const counts = q.counts || {};
    const summary = [];
    const item = (term, value) => summary.push(el("div", {}, el("dt", {}, term), el("dd", {}, value)));
    for (const s of stateColumns([q])) item(s, el("span", { "data-state": s }, fmtCount(counts[s] || 0)));
    item("bytes", fmtBytes(q.bytes));
    item("oldest", fmtAge(q.oldest_age_seconds));
    item("rates", rateText(q.rates));
    item("health", health(q));
    $("queue-summary").replaceChildren(...summary);
    $("rates-chart").replaceChildren(sparkline(q.series, { width: 320, height: 130, axes: true }));
    const caption = seriesLines(Array.isArray(q.series) ? q.series : []).label;
    $("rates-caption").textContent = capitalised(caption);
    renderTabs(counts);
    const pipers = Array.isArray(q.pipers) ? q.pipers : [];
    $("pipers-body").replaceChildren(...pipers.map((p) => el("tr", {},
      el("td", {}, text(p.name)), el("td", {}, text(p.host)), el("td", { class: "num" }, text(p.pid)),
      el("td", {}, p.alive ? badge("alive", "good") : badge("not alive", "bad")),
      el("td", { class: "num" }, fmtAge(p.heartbeat_age_seconds)),
      el("td", {}, text(p.state)),
      el("td", {}, p.breaker === "open" ? badge("open", "bad") : text(p.breaker)),
      el("td", {}, p.backpressure === true ? badge("yes", "warn") : p.backpressure === false ? "no" : "—"))));
    show($("pipers-wrap"), pipers.length > 0);
  }

  function renderTabs(counts) {
    const current = view.route.state;
    const states = stateColumns([{ counts }]);
    if (!states.includes(current)) states.push(current);
    const tabs = states.map((s) => el("a", {
      role: "tab", id: "tab-" + cssToken(s), "data-state": s,
      href: "#/queue/" + encodeURIComponent(view.route.queue) + "/" + encodeURIComponent(s),
      "aria-selected": s === current ? "true" : "false",
      class: "tab" + (s === current ? " active" : ""),
    }, s + " ", el("span", { class: "tab-count" }, fmtCount(counts[s] || 0))));
    $("tabs").replaceChildren(...tabs);
  }

  function renderMessages(page) {
    const messages = Array.isArray(page.messages) ? page.messages : [];
    if (!messages.length && view.offset > 0) {
      // The page emptied under us (messages taken or acted on): go back one.
      view.offset = Math.max(0, view.offset - PAGE);
      setTimeout(poll, 0);
      return;
    }
    // Ages change on every poll: update them in place, and redraw the rows (and their
    // buttons) only when something else changed.
    const key = JSON.stringify(Object.assign({}, page, {
      messages: messages.map((m) => Object.assign({}, m, { age_seconds: null })),
    })) + "|" + view.readOnly;
    if (key === view.lastMessages) {
      for (const m of messages) {
        const row = $("messages-body").querySelector('tr[data-id="' + CSS.escape(String(m.id)) + '"] .age');
        if (row) row.textContent = fmtAge(m.age_seconds);
      }
      return;
    }
    view.lastMessages = key;
    const state = view.route.state;
    $("messages-caption").textContent = "Messages in " + state + " of " + view.route.queue;
    const actions = ACTIONS[state] || ["delete"];
    const rows = messages.map((m) => el("tr", { "data-id": m.id },
      el("td", {}, el("button", { type: "button", class: "link id", "data-view": m.id, title: "show the body" }, m.id)),
      el("td", { class: "num" }, fmtBytes(m.size)),
      el("td", { class: "num age" }, fmtAge(m.age_seconds)),
      el("td", { class: "num" }, text(m.attempts)),
      el("td", {}, fmtDue(m.due)),
      el("td", {}, typeof m.owner === "number" ? "pid " + m.owner : text(m.owner)),
      el("td", {}, el("div", { class: "reason", title: reasonOf(m) || null }, reasonOf(m) || "—")),
      el("td", { class: "actions" }, actions.map((a) => el("button", {
        type: "button", class: "act act-" + a, "data-action": a, "data-id": m.id,
        disabled: view.readOnly === true,
        title: view.readOnly ? "serve is read-only" : a + " this message",
      }, a)))));
    replaceKeepingFocus($("messages-body"), rows);
    show($("messages-empty"), messages.length === 0);
    const total = typeof page.total === "number" ? page.total : messages.length;
    const offset = page.offset || 0;
    show($("pager"), total > PAGE || offset > 0);
    $("page-info").textContent = messages.length
      ? (offset + 1) + "–" + (offset + messages.length) + " of " + total
      : "0 of " + total;
    $("prev-page").disabled = offset <= 0;
    $("next-page").disabled = offset + messages.length >= total;
  }

  // The failure reason, with the exit code and the stderr tail that `dirq exec` keeps when
  // they add to it.
  function reasonOf(m) {
    const parts = [];
    if (m.reason) parts.push(String(m.reason));
    else if (typeof m.exit_code === "number") parts.push("exit " + m.exit_code);
    if (m.stderr && m.stderr !== m.reason) parts.push(String(m.stderr).trim());
    return parts.join(": ");
  }

  function renderAges(data) {
    const key = JSON.stringify(data);
    if (key === view.lastAges) return;
    view.lastAges = key;
    $("ages-chart").replaceChildren(histogram(parseAges(data)));
  }

  async function showBody(id) {
    const { queue, state } = view.route;
    const gen = view.generation;
    $("body-id").textContent = id;
    $("body-meta").textContent = "loading…";
    $("body-text").textContent = "";
    show($("body-view"), true);
    try {
      const response = await request(queuePath(queue) + "/messages/" + encodeURIComponent(id));
      const bytes = new Uint8Array(await response.arrayBuffer());
      if (gen !== view.generation) return;
      const shown = bytes.subarray(0, BODY_LIMIT);
      $("body-text").textContent = new TextDecoder("utf-8", { fatal: false }).decode(shown);
      const where = response.headers.get("X-Dirq-State") || state;
      $("body-meta").textContent = fmtBytes(bytes.length) + " in " + where +
        (bytes.length > BODY_LIMIT ? ", showing the first " + fmtBytes(BODY_LIMIT) : "");
    } catch (err) {
      $("body-meta").textContent = "Could not read the body: " + err.message;
    }
    $("body-view").scrollIntoView({ block: "nearest" });
  }

  // ----- actions -----

  function askAction(action, id) {
    const { queue } = view.route;
    view.pending = { action, id, queue };
    $("confirm-title").textContent = capitalised(action) + " message";
    $("confirm-text").textContent = capitalised(action) + " message " + id + " in queue " + queue + "?";
    const needToken = view.readOnly !== true;
    show($("token-row"), needToken);
    $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
    show($("confirm-error"), false);
    $("confirm-ok").textContent = action;
    $("confirm-ok").disabled = false;
    $("confirm").showModal();
    (needToken && !$("token").value ? $("token") : $("confirm-ok")).focus();
  }

  async function confirmAction(event) {
    event.preventDefault();
    const pending = view.pending;
    if (!pending) return;
    const token = $("token").value.trim();
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    $("confirm-ok").disabled = true;
    try {
      await request(queuePath(pending.queue) + "/messages/" + encodeURIComponent(pending.id) + "/" + pending.action,
        { method: "POST", headers });
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      updateTokenButton();
      view.pending = null;
      $("confirm").close();
      note(pending.id + " " + (ACTION_DONE[pending.action] || pending.action) + ".", "ok");
      poll();
    } catch (err) {
      if (err.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        updateTokenButton();
      }
      const error = $("confirm-error");
      error.textContent = pending.action + " failed: " + err.message;
      show(error, true);
      $("confirm-ok").disabled = false;
      if (err.status === 401 && !$("token-row").hidden) $("token").select();
    }
  }

  function cancelAction() {
    if (view.pending) note(view.pending.action + " of " + view.pending.id + " cancelled; nothing changed.", "muted");
    view.pending = null;
    if ($("confirm").open) $("confirm").close();
  }

  function note(message, cls) {
    const result = $("action-result");
    result.textContent = message;
    result.className = "action-result " + cls;
    show(result, true);
  }

  // ----- routing and polling -----

  function parseRoute() {
    const hash = location.hash.replace(/^#/, "");
    const m = /^\/queue\/([^/]+)(?:\/([^/]+))?$/.exec(hash);
    if (!m) return { page: "overview" };
    try {
      return { page: "queue", queue: decodeURIComponent(m[1]), state: m[2] ? decodeURIComponent(m[2]) : "incoming" };
    } catch (_) {
      return { page: "overview" };
    }
  }

  function navigate() {
    const before = view.route;
    view.route = parseRoute();
    view.generation += 1;
    const samePage = before.page === view.route.page && before.queue === view.route.queue;
    if (!samePage || before.state !== view.route.state) {
      view.offset = 0;
      view.lastMessages = "";
      $("messages-body").replaceChildren();
      show($("action-result"), false);
      show($("body-view"), false);
    }
    if (!samePage) {
      view.lastQueue = "";
      view.lastAges = "";
      view.lastOverview = "";
    }
    const onQueue = view.route.page === "queue";
    show($("overview"), !onQueue);
    show($("queue"), onQueue);
    if (onQueue) {
      $("queue-name").textContent = view.route.queue;
      document.title = view.route.queue + " · dirq console";
    } else {
      document.title = "dirq console";
    }
    poll();
  }

  // One poll at a time counts: a poll started later (a navigation, an action) makes the
  // answers of any earlier one stale, and only the latest schedules the next.
  async function poll() {
    clearTimeout(view.timer);
    const seq = ++view.pollSeq;
    const stale = () => seq !== view.pollSeq;
    try {
      if (view.route.page === "queue") {
        const { queue, state } = view.route;
        const path = queuePath(queue);
        const [q, page, ages, all] = await Promise.all([
          getJSON(path),
          getJSON(path + "/messages?state=" + encodeURIComponent(state) + "&offset=" + view.offset + "&limit=" + PAGE),
          getJSON(path + "/ages").catch((err) => {
            if (isLost(err)) throw err;
            return null;
          }),
          view.readOnly === null ? getJSON(API + "/queues") : Promise.resolve(null),
        ]);
        if (stale()) return;
        if (all) setReadOnly(all.read_only);
        renderQueue(q);
        renderMessages(page);
        if (ages) renderAges(ages);
      } else {
        const all = await getJSON(API + "/queues");
        if (stale()) return;
        setReadOnly(all.read_only);
        renderOverview(all);
      }
      connected();
    } catch (err) {
      if (stale()) return;
      if (isLost(err)) {
        lostServer(err);
      } else {
        connected();
        $("status").textContent = err.message;
        $("status").className = "status warn";
      }
    } finally {
      if (!stale()) view.timer = setTimeout(poll, POLL_MS);
    }
  }

  function start() {
    $("messages-body").addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button) return;
      if (button.dataset.view) showBody(button.dataset.view);
      else if (button.dataset.action) askAction(button.dataset.action, button.dataset.id);
    });
    $("confirm-form").addEventListener("submit", confirmAction);
    $("confirm-cancel").addEventListener("click", cancelAction);
    $("confirm").addEventListener("cancel", () => { view.pending = null; });
    $("close-body").addEventListener("click", () => show($("body-view"), false));
    $("prev-page").addEventListener("click", () => {
      view.offset = Math.max(0, view.offset - PAGE);
      poll();
    });
    $("next-page").addEventListener("click", () => {
      view.offset += PAGE;
      poll();
    });
    $("forget-token").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      updateTokenButton();
    });
    window.addEventListener("hashchange", navigate);
    updateTokenButton();
    navigate();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
