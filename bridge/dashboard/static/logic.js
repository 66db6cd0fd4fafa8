// The dashboard's pure rules: no DOM, no network, no clock (tests call them table-driven
// through the browser, tests/dashboard/test_logic.py).
"use strict";

// eslint-disable-next-line no-unused-vars
const MBLogic = (() => {
  const MAX_TEXT = 40; // a value from the wire is cut to this many characters on screen

  // Full jitter: uniform in [0, min(cap, base * 2^attempt)), so clients that lost the broker
  // together do not come back together (MQTT.js's fixed 1 s period would).
  function backoffDelay(attempt, baseMs, capMs, random) {
    const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(Math.max(attempt, 0), 30));
    return Math.floor(random() * ceiling);
  }

  // What to do with a tick given the topic's last seq: "show", "stale" (at or below the last
  // one: a duplicate or reordered copy, dropped), or "gap" (ticks were missed: show, count,
  // re-sync). A retained message is a snapshot: it sets the baseline whatever its number.
  function seqVerdict(last, seq, retained) {
    if (seq === null || retained || last === null) return { action: "show", missed: 0 };
    if (seq <= last) return { action: "stale", missed: 0 };
    if (seq === last + 1) return { action: "show", missed: 0 };
    return { action: "gap", missed: seq - last - 1 };
  }

  // "2026-11-30T12:00:00.123+01:00" -> {date, time: "12:00:00", offset: "+01:00"}; the broker
  // already localised it, so it is shown as sent (not in the browser's own zone).
  function splitTs(ts) {
    if (typeof ts !== "string") return null;
    const m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(?:\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$/.exec(ts);
    if (m === null) return null;
    return { date: m[1], time: m[2], offset: m[3] === "Z" ? "+00:00" : m[3] };
  }

  function clip(value) {
    const text = String(value);
    return text.length > MAX_TEXT ? `${text.slice(0, MAX_TEXT - 1)}…` : text;
  }

  // market/<exchange>/<pair>, bounded: anything else is not a row.
  function parseTopic(topic) {
    const m = /^market\/([A-Za-z0-9_.-]{1,32})\/([A-Za-z0-9_.-]{1,32})$/.exec(topic);
    return m === null ? null : { exchange: m[1], pair: m[2] };
  }

  // "#token=abc&x=y" -> "abc" (the fragment never goes to the server); null when absent.
  function fragmentToken(hash) {
    const token = new URLSearchParams(String(hash).replace(/^#/, "")).get("token");
    return token ? token : null;
  }

  // The JWT's sub and tz, read without verifying (the broker verifies): the MQTT username
  // must be the sub, and the viewer sees whose zone the times are in.
  function tokenClaims(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const json = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
      return {
        sub: typeof json.sub === "string" ? json.sub : null,
        tz: typeof json.tz === "string" ? json.tz : null,
      };
    } catch {
      return { sub: null, tz: null };
    }
  }

  // SVG polyline points for values in a width x height box (flat line when all are equal).
  function sparkPoints(values, width, height) {
    if (values.length === 0) return "";
    const low = Math.min(...values);
    const span = Math.max(...values) - low;
    const step = values.length > 1 ? width / (values.length - 1) : 0;
    return values
      .map((v, i) => {
        const y = span === 0 ? height / 2 : height - 1 - ((v - low) / span) * (height - 2);
        return `${(i * step).toFixed(1)},${y.toFixed(1)}`;
      })
      .join(" ");
  }

  return { backoffDelay, clip, fragmentToken, parseTopic, seqVerdict, sparkPoints, splitTs, tokenClaims };
})();
