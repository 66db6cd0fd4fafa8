// The dashboard: one MQTT.js connection to the broker's WebSocket listener, a table per
// exchange. Everything from the wire reaches the DOM through textContent or setAttribute on
// SVG geometry, never as markup.
"use strict";

(() => {
  const L = MBLogic;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 30_000;
  const SPARK_POINTS = 60;
  const MAX_ROWS = 500; // a publisher inventing topics cannot grow the page without bound
  const FIELDS = ["bid", "ask", "last", "volume_24h"];

  const $ = (id) => document.getElementById(id);
  const stateEl = $("state");
  const retryEl = $("retry");
  const reconnectsEl = $("reconnects");
  const zoneEl = $("zone");
  const marketsEl = $("markets");

  const token = L.fragmentToken(location.hash);
  const claims = token === null ? null : L.tokenClaims(token);
  $("who").textContent =
    token === null ? "anonymous (public access)" : `${L.clip(claims.sub ?? "?")} (token)`;

  const exchanges = new Map(); // exchange -> tbody
  const rows = new Map(); // topic -> row state
  let client = null;
  let attempt = 0;
  let connectedOnce = false;
  let reconnects = 0;
  const decoder = new TextDecoder();
  const dirty = new Set(); // rows with a tick not yet on screen
  let frameRequested = false;

  function setState(state, detail) {
    stateEl.dataset.state = state;
    stateEl.textContent = detail ? `${state}: ${L.clip(detail)}` : state;
  }

  function scheduleReconnect() {
    const delay = L.backoffDelay(attempt, BACKOFF_BASE_MS, BACKOFF_CAP_MS, Math.random);
    attempt += 1;
    retryEl.textContent = `(retry ${attempt} in ${(delay / 1000).toFixed(1)} s)`;
    setTimeout(start, delay);
  }

  // Each attempt asks the server where the listener is: a restarted node may have moved it.
  async function start() {
    retryEl.textContent = "";
    setState(connectedOnce ? "reconnecting" : "connecting");
    if (typeof mqtt === "undefined") {
      setState("error", "MQTT.js did not load (run make install on the server)");
      return;
    }
    let config;
    try {
      const response = await fetch("/dashboard/config.json", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`); // 503: stopping or starting
      config = await response.json();
    } catch {
      setState(connectedOnce ? "reconnecting" : "connecting", "the server is not ready");
      scheduleReconnect();
      return;
    }
    if (!config.ws) {
      // Off in this node's configuration; a restarted node may have it on.
      setState("error", "the broker's WebSocket listener is off");
      scheduleReconnect();
      return;
    }
    const host = location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname;
    connect(`${config.ws.tls ? "wss" : "ws"}://${host}:${config.ws.port}${config.ws.path}`);
  }

  function connect(url) {
    const options = {
      protocolVersion: 4,
      clean: true,
      keepalive: 30,
      connectTimeout: 10_000,
      reconnectPeriod: 0, // ours: exponential backoff with full jitter
      clientId: `dash-${Math.random().toString(16).slice(2, 14)}`,
    };
    if (token !== null) {
      options.username = claims.sub ?? "";
      options.password = token;
    }
    const c = mqtt.connect(url, options);
    client = c;
    let failure = null;
    c.on("connect", () => {
      attempt = 0;
      if (connectedOnce) reconnects += 1;
      connectedOnce = true;
      reconnectsEl.dataset.count = String(reconnects);
      reconnectsEl.textContent = String(reconnects);
      setState("connected");
      for (const entry of rows.values()) entry.resyncing = false; // a new session: no pending re-syncs
      c.subscribe("market/#", { qos: 0 }, (err, granted) => {
        if (err || !granted || granted.some((g) => g.qos === 128)) setState("error", "subscription to market/# refused");
      });
    });
    c.on("message", (topic, payload, packet) => {
      if (client === c) onMessage(topic, payload, packet.retain === true);
    });
    c.on("error", (err) => {
      failure = err && err.message ? err.message : "connection error";
    });
    c.on("close", () => {
      if (client !== c) return;
      client = null;
      c.end(true);
      setState(failure && /refused|authori[sz]/i.test(failure) ? "refused" : "disconnected", failure ?? "");
      scheduleReconnect();
    });
  }

  function exchangeBody(exchange) {
    let body = exchanges.get(exchange);
    if (body !== undefined) return body;
    const section = document.createElement("section");
    section.className = "exchange";
    section.dataset.exchange = exchange;
    const title = document.createElement("h2");
    title.textContent = exchange;
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    for (const label of ["pair", "bid", "ask", "last", "24h volume", "time", "recent", "gaps"]) {
      const th = document.createElement("th");
      th.textContent = label;
      head.appendChild(th);
    }
    body = table.createTBody();
    section.append(title, table);
    const after = [...marketsEl.querySelectorAll("section.exchange")].find((s) => s.dataset.exchange > exchange);
    marketsEl.insertBefore(section, after ?? null);
    $("empty")?.remove();
    exchanges.set(exchange, body);
    return body;
  }

  function addRow(topic, where) {
    const body = exchangeBody(where.exchange);
    const row = document.createElement("tr");
    row.dataset.topic = topic;
    row.dataset.pair = where.pair;
    const cells = {};
    for (const name of ["pair", ...FIELDS, "time", "spark", "gaps"]) {
      const td = document.createElement("td");
      td.className = name;
      row.appendChild(td);
      cells[name] = td;
    }
    cells.pair.textContent = where.pair;
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", "0 0 90 22");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    svg.appendChild(line);
    cells.spark.appendChild(svg);
    const after = [...body.rows].find((r) => r.dataset.pair > where.pair);
    body.insertBefore(row, after ?? null);
    const entry = { topic, row, cells, line, seq: null, values: [], gaps: 0, missed: 0, resyncs: 0, resyncing: false };
    showGaps(entry);
    rows.set(topic, entry);
    return entry;
  }

  function showGaps(entry) {
    entry.row.dataset.gaps = String(entry.gaps);
    entry.row.dataset.resyncs = String(entry.resyncs);
    entry.row.classList.toggle("resyncing", entry.resyncing);
    entry.cells.gaps.textContent = String(entry.gaps);
    entry.cells.gaps.title = `${entry.missed} tick(s) missed, ${entry.resyncs} re-sync(s)`;
  }

  // A new subscription to the exact topic brings its retained snapshot; the wildcard one
  // keeps the stream (copies from both are dropped as stale by seq).
  function resync(entry) {
    if (entry.resyncing || client === null) return;
    entry.resyncing = true;
    client.subscribe(entry.topic, { qos: 0 });
  }

  function setCell(cell, text) {
    if (cell.textContent === text) return;
    const before = Number(cell.textContent);
    const after = Number(text);
    cell.textContent = text;
    if (cell.dataset.seen && Number.isFinite(before) && Number.isFinite(after) && before !== after) {
      // Two animation names taking turns restart the flash without forcing a layout.
      cell.dataset.flash = after > before ? "up" : "down";
      cell.dataset.turn = cell.dataset.turn === "a" ? "b" : "a";
    }
    cell.dataset.seen = "1";
  }

  function onMessage(topic, payload, retained) {
    const where = L.parseTopic(topic);
    if (where === null) return;
    let tick;
    try {
      tick = JSON.parse(decoder.decode(payload));
    } catch {
      return;
    }
    if (tick === null || typeof tick !== "object") return;
    let entry = rows.get(topic);
    if (entry === undefined) {
      if (rows.size >= MAX_ROWS) return;
      entry = addRow(topic, where);
    }
    const seq = Number.isSafeInteger(tick.seq) ? tick.seq : null;
    const verdict = L.seqVerdict(entry.seq, seq, retained);
    if (verdict.action === "stale") return;
    if (seq !== null) entry.seq = seq;
    if (verdict.action === "gap") {
      entry.gaps += 1;
      entry.missed += verdict.missed;
      resync(entry);
    } else if (retained && entry.resyncing) {
      entry.resyncing = false;
      entry.resyncs += 1;
      client?.unsubscribe(topic);
    }
    const last = Number(tick.last);
    if (Number.isFinite(last)) {
      entry.values.push(last);
      if (entry.values.length > SPARK_POINTS) entry.values.shift();
    }
    entry.tick = tick;
    dirty.add(entry);
    if (!frameRequested) {
      frameRequested = true;
      requestAnimationFrame(paint);
    }
  }

  // The DOM is written once per frame with each row's latest tick: a burst of ticks costs
  // one update per row, not one per tick (the seq check above still sees every tick).
  function paint() {
    frameRequested = false;
    for (const entry of dirty) {
      render(entry, entry.tick);
      entry.row.dataset.seq = String(entry.seq);
      showGaps(entry);
    }
    dirty.clear();
  }

  function render(entry, tick) {
    for (const field of FIELDS) setCell(entry.cells[field], tick[field] === undefined ? "" : L.clip(tick[field]));
    const ts = L.splitTs(tick.ts);
    entry.cells.time.textContent = ts === null ? "" : `${ts.time} ${ts.offset}`;
    entry.cells.time.title = typeof tick.ts === "string" ? L.clip(tick.ts) : "";
    if (ts !== null) {
      const zone = typeof tick.tz === "string" ? `${L.clip(tick.tz)} ` : "";
      zoneEl.textContent = `${zone}(UTC${ts.offset})`;
    }
    entry.line.setAttribute("points", L.sparkPoints(entry.values, 90, 22));
  }

  start();
})();
