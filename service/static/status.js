// The status page: one EventSource on /status/events; each `state` event is the whole
// state, rendered with textContent only (reasons are operator text: never markup).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k.startsWith("data-")) node.dataset[k.slice(5).replace(/-(.)/g, (_, c) => c.toUpperCase())] = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function ms(v) { return v === null || v === undefined ? "–" : `${Math.round(v)} ms`; }

  function ago(epoch) {
    if (!epoch) return "";
    const s = Math.max(0, Date.now() / 1000 - epoch);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }

  function clock(epoch) {
    return new Date(epoch * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function badge(value) {
    return el("span", { class: "badge", "data-state": value }, value.replace("_", "-"));
  }

  function card(p) {
    const c = el("article", { class: "card", "data-provider": p.name, "data-breaker": p.breaker, "data-health": p.health });
    const h = el("h3", {}, p.name);
    h.append(el("span", { class: "kind" }, `${p.kind} · priority ${p.priority}`));
    c.append(h);

    const health = el("div", { class: "row" });
    health.append(el("span", { class: "label" }, "health"), badge(p.health));
    c.append(health);
    if (p.reason && p.health !== "healthy") c.append(el("p", { class: "why" }, p.reason));

    const breaker = el("div", { class: "row" });
    breaker.append(el("span", { class: "label" }, "breaker"), badge(p.breaker));
    c.append(breaker);
    if (p.breaker_reason) c.append(el("p", { class: "why breaker-reason" }, p.breaker_reason));
    if (p.forced) {
      const until = p.forced.expires_at ? ` until ${clock(p.forced.expires_at)}` : "";
      c.append(el("p", { class: "why" }, `forced open by an operator${until}: ${p.forced.reason}`));
    }

    const st = p.probe_stats;
    const dl = el("dl", { class: "figures" });
    const rows = [
      ["probe latency p50", ms(st && st.latency_p50_ms)], ["p95", ms(st && st.latency_p95_ms)],
      ["TTFT p50", ms(st && st.ttft_p50_ms)], ["p95", ms(st && st.ttft_p95_ms)],
      ["probes ok (5 min)", st ? `${st.ok}/${st.samples}` : "–"],
      ["last probe", p.probes.length ? ago(p.probes[p.probes.length - 1].at) : "–"],
    ];
    for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, v));
    c.append(dl);

    if (p.probes.length) {
      const spark = el("div", { class: "spark", title: "recent probes: height is latency, red failed" });
      const max = Math.max(1, ...p.probes.map((s) => s.latency_ms || 0));
      for (const s of p.probes) {
        const bar = el("i", s.ok ? {} : { class: "bad" });
        bar.style.height = `${Math.max(8, (100 * (s.latency_ms || 0)) / max)}%`;
        bar.title = `${clock(s.at)} ${s.ok ? "ok" : s.error_class || "failed"} ${ms(s.latency_ms)}`;
        spark.append(bar);
      }
      c.append(spark);
    }
    return c;
  }

  function render(state) {
    const level = state.degradation.level;
    const lv = $("level");
    lv.dataset.level = level;
    lv.textContent = level;
    const d = state.degradation;
    $("level-reason").textContent = level === "normal" && !d.reason ? "" :
      `${d.source === "operator" ? "set by an operator" : "automatic"}${d.reason ? ": " + d.reason : ""}`;

    $("providers").replaceChildren(...state.providers.map(card));

    const inc = state.incidents.map((i) => {
      const li = el("li", { "data-provider": i.provider, "data-to": i.to_state });
      li.append(el("time", { datetime: new Date(i.at * 1000).toISOString() }, clock(i.at)));
      li.append(document.createTextNode(`${i.provider}: `));
      li.append(badge(i.to_state));
      li.append(document.createTextNode(` ${i.reason} (${i.by})`));
      return li;
    });
    $("incidents").replaceChildren(...inc);
    $("no-incidents").hidden = inc.length > 0;

    $("errors-window").textContent = String(Math.round(state.errors_window_sec / 60));
    const trs = state.errors.map((e) => {
      const tr = el("tr");
      tr.append(el("td", {}, e.provider || "(none)"), el("td", {}, e.error_class),
                el("td", {}, e.count), el("td", {}, ago(e.last_at)));
      return tr;
    });
    $("errors").tBodies[0].replaceChildren(...trs);
    $("errors").hidden = trs.length === 0;
    $("no-errors").hidden = trs.length > 0;

    const sh = state.shared;
    $("shared").textContent = sh.healthd === "off"
      ? "No database: this web process's own view (no healthd, no history)."
      : `Shared state ${sh.synced ? "in sync" : "NOT in sync (showing the last view)"} · healthd ${sh.healthd} · history ${sh.history}`;
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  }

  function connect() {
    const source = new EventSource("/status/events");
    source.addEventListener("state", (ev) => {
      document.body.dataset.live = "live";
      $("live").textContent = `live · updated ${clock(Date.now() / 1000)}`;
      render(JSON.parse(ev.data));
    });
    source.addEventListener("error", () => {
      // EventSource reconnects by itself (the server sends `retry:`); just say so.
      document.body.dataset.live = "reconnecting";
      $("live").textContent = "reconnecting…";
    });
  }

  connect();
})();
