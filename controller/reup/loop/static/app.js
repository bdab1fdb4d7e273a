// The reup fleet page: renders /api/fleet, refreshes on server-sent `change` events (or polls
// every 5 s when they are unavailable). Read-only. Written for reup; see LICENSE.md.
"use strict";
(() => {
  const PAGE = 100;
  const $ = (id) => document.getElementById(id);
  let doc = null, page = 0, fetching = false, again = false, pollTimer = null, wanted = 0, lateTimer = null;

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "style" || k.startsWith("data-") || k.startsWith("aria-")) e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  }
  const short = (p) => { if (!p) return "-"; const b = p.split("/").pop(); const i = b.indexOf("-"); return i > 0 ? b.slice(i + 1) : b; };
  const lastLine = (t) => { const l = (t || "").trim().split("\n").filter(Boolean); return l.length ? l[l.length - 1] : ""; };
  function ago(t) {
    if (!t) return "-";
    const s = Math.max(0, Date.now() / 1000 - t);
    return s < 60 ? `${Math.round(s)} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : s < 86400 ? `${Math.round(s / 3600)} h ago` : new Date(t * 1000).toLocaleString();
  }
  const clock = (t) => new Date(t * 1000).toLocaleTimeString();
  function bytes(n) {
    if (n == null) return "-";
    const u = ["B", "KiB", "MiB", "GiB"]; let i = 0; let v = n;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return i ? `${v.toFixed(1)} ${u[i]}` : `${v} B`;
  }

  async function refresh() {
    if (fetching) { again = true; return; }
    fetching = true;
    try {
      const r = await fetch("/api/fleet", { cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      doc = await r.json();
      render();
      if (!performance.getEntriesByName("reup-rendered").length) performance.mark("reup-rendered");
      // the server builds at most one snapshot per 0.5 s: if it handed an older one, ask again once
      clearTimeout(lateTimer);
      if (doc.page.version < wanted) lateTimer = setTimeout(refresh, 600);
    } catch (e) {
      $("live").textContent = `cannot load the fleet: ${e.message}`;
    } finally {
      fetching = false;
      if (again) { again = false; refresh(); }
    }
  }

  function waveNames() {
    const r = doc.rollout;
    const names = r && r.waves ? Object.keys(r.waves) : [];
    for (const d of doc.devices) if (!names.includes(d.wave)) names.push(d.wave);
    return names;
  }

  function phaseOf(i, w, r) {
    const current = i === r.wave_index;
    if (current && r.baking_until && !r.halted && !r.paused) return ["baking", `baking until ${clock(r.baking_until)}`];
    if (w.devices && w.committed >= w.devices) return ["done", "done"];
    if (r.paused) return ["paused", "paused"];
    if (i < r.wave_index) return ["done", "done (enough committed)"];
    if (current) return r.halted ? ["halted", "halted"] : ["rolling", "rolling out"];
    return r.halted ? ["halted", "halted"] : ["waiting", "waiting"];
  }

  function renderWaves() {
    const r = doc.rollout, ol = $("waves");
    ol.replaceChildren();
    ol.dataset.revision = (r && r.revision) || "";
    $("progress").textContent = r ? `${Math.round(100 * (r.progress || 0))}% of devices on target` : "";
    if (!r || !r.waves) return;
    Object.entries(r.waves).forEach(([name, w], i) => {
      const [phase, label] = phaseOf(i, w, r);
      const pct = (n) => (w.devices ? (100 * n) / w.devices : 0);
      const bar = el("div", { class: "bar", "aria-hidden": "true" },
        el("span", { class: "c", style: `width:${pct(w.committed)}%` }),
        el("span", { class: "f", style: `width:${pct(w.failed)}%` }),
        el("span", { class: "u", style: `width:${pct(w.updating)}%` }));
      ol.append(el("li", { class: "wave", "data-wave": name, "data-phase": phase },
        el("div", { class: "name" }, `${i + 1}. ${name}`),
        bar,
        el("div", {}, `${w.committed}/${w.devices} committed` + (w.failed ? `, ${w.failed} failed` : "") + (w.updating ? `, ${w.updating} updating` : "")),
        el("div", { class: "phase" }, label)));
    });
  }

  function fillSelect(sel, values) {
    const cur = sel.value;
    sel.replaceChildren(el("option", { value: "" }, "all"), ...values.map((v) => el("option", { value: v }, v)));
    sel.value = values.includes(cur) ? cur : "";
  }

  function filtered() {
    const wave = $("f-wave").value, state = $("f-state").value, tag = $("f-tag").value;
    const q = $("f-search").value.trim().toLowerCase();
    const tags = doc.page.tags || {};
    return doc.devices.filter((d) =>
      (!wave || d.wave === wave) && (!state || d.state === state) && (!tag || (tags[d.name] || []).includes(tag)) &&
      (!q || [d.name, d.last_error, d.target, d.acknowledged, ...(tags[d.name] || [])].some((s) => s && s.toLowerCase().includes(q))));
  }

  function renderDevices() {
    const list = filtered(), sent = doc.page.bytes_sent || {};
    const pages = Math.max(1, Math.ceil(list.length / PAGE));
    page = Math.min(page, pages - 1);
    $("count").textContent = `${list.length} of ${doc.devices.length}`;
    $("page").textContent = `page ${page + 1} of ${pages}`;
    $("prev").disabled = page === 0; $("next").disabled = page >= pages - 1;
    const rows = list.slice(page * PAGE, page * PAGE + PAGE).map((d) => el("tr", { "data-device": d.name, "data-state": d.state },
      el("th", { scope: "row" }, el("button", { type: "button", class: "linkish", "data-open": d.name, "aria-label": `Details of ${d.name}` }, d.name)),
      el("td", { "data-label": "State" }, el("span", { class: `state s-${d.state}` }, d.state.replace("_", " "))),
      el("td", { "data-label": "Wave" }, d.wave),
      el("td", { class: "wide", title: d.target || "" }, el("code", {}, short(d.target))),
      el("td", { class: "wide", title: d.acknowledged || "" }, el("code", {}, short(d.acknowledged)) ),
      el("td", { class: "num", "data-label": "Bytes sent" }, bytes(sent[d.name])),
      el("td", { class: "err", "data-label": "Last error" }, lastLine(d.last_error)),
      el("td", { "data-label": "When" }, ago(d.updated_at))));
    document.querySelector("#devices tbody").replaceChildren(...rows);
  }

  function render() {
    const r = doc.rollout, p = doc.page;
    document.body.dataset.version = p.version;
    $("rev-commit").textContent = doc.revision ? doc.revision.slice(0, 12) : "no revision yet";
    $("rev-commit").title = doc.revision || "";
    $("rev-message").textContent = p.message || "";
    $("rev-author").textContent = p.author ? `by ${p.author}` : "";
    $("rev-seen").textContent = doc.revision_seen_at ? `${p.author ? "· " : ""}seen ${ago(doc.revision_seen_at)}` : "";
    const fe = $("fleet-error"); fe.hidden = !doc.fleet_error; fe.textContent = doc.fleet_error ? `fleet.toml error: ${doc.fleet_error}` : "";
    const h = $("halted");
    const refused = doc.refused ? `Head ${doc.refused.revision.slice(0, 12)} refused (${doc.refused.reason}): ${doc.refused.error}` : "";
    const halt = r && r.halted ? `Rollout halted: ${r.halted}` : r && r.paused ? "Rollout paused" : "";
    h.hidden = !(halt || refused); h.textContent = [halt, refused].filter(Boolean).join(" · ");
    const g = $("grafana"); g.hidden = !p.grafana_url; if (p.grafana_url) g.href = p.grafana_url;
    fillSelect($("f-wave"), waveNames());
    fillSelect($("f-state"), [...new Set(doc.devices.map((d) => d.state))].sort());
    fillSelect($("f-tag"), [...new Set(Object.values(p.tags || {}).flat())].sort());
    renderWaves();
    renderDevices();
    const dlg = $("detail");
    if (dlg.open && dlg.dataset.device) openDetail(dlg.dataset.device, false);
  }

  function describe(e) {
    const d = e.data || {};
    switch (e.kind) {
      case "DeviceStateChanged": return `${d.old || "new"} → ${d.new}` + (d.reason ? ` (${lastLine(d.reason)})` : "");
      case "DeviceUpdated": return `update ${d.result} ${short(d.toplevel)}` + (d.error ? `: ${lastLine(d.error)}` : "");
      case "TransferFinished": return `sent ${bytes(d.stream_bytes)} (a full copy: ${bytes(d.nar_bytes)}) in ${Number(d.seconds).toFixed(1)} s`;
      case "ReconcileError": return `${d.stage} error: ${lastLine(d.error)}`;
      default: return e.kind;
    }
  }

  async function openDetail(name, show = true) {
    const dlg = $("detail");
    dlg.dataset.device = name;
    const r = await fetch(`/api/device?name=${encodeURIComponent(name)}`, { cache: "no-store" });
    if (!r.ok) return;
    const info = await r.json(), d = info.device;
    $("detail-h").textContent = `Device ${name}`;
    const facts = [["State", d.state], ["Wave", d.wave], ["Tags", (info.tags || []).join(", ") || "-"], ["Host", info.host || "-"],
      ["Target", d.target || "-"], ["Acknowledged", d.acknowledged || "-"], ["Generation", d.generation ?? "-"],
      ["Bytes sent", bytes((doc.page.bytes_sent || {})[name])], ["Last error", d.last_error || "-"], ["Updated", ago(d.updated_at)]];
    $("detail-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
    $("detail-events").replaceChildren(...info.events.slice().reverse().map((e) =>
      el("li", { "data-kind": e.kind }, el("time", { dateTime: new Date(e.at * 1000).toISOString() }, new Date(e.at * 1000).toLocaleTimeString()), " ", describe(e))));
    if (show && !dlg.open) dlg.showModal();
  }

  function poll() { clearTimeout(pollTimer); pollTimer = setTimeout(() => { refresh().then(poll); }, 5000); }

  function connect() {
    if (!window.EventSource) { $("live").textContent = "polling every 5 s"; poll(); return; }
    const es = new EventSource("/api/events");
    es.addEventListener("change", (ev) => { wanted = Math.max(wanted, Number(ev.data) || 0); refresh(); });
    es.onopen = () => { $("live").textContent = "live"; $("live").classList.add("on"); clearTimeout(pollTimer); };
    es.onerror = () => {
      $("live").classList.remove("on");
      if (es.readyState === EventSource.CLOSED) { $("live").textContent = "polling every 5 s"; poll(); }
      else $("live").textContent = "reconnecting…";
    };
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const id of ["f-wave", "f-state", "f-tag"]) $(id).addEventListener("change", () => { page = 0; if (doc) renderDevices(); });
    $("f-search").addEventListener("input", () => { page = 0; if (doc) renderDevices(); });
    $("prev").addEventListener("click", () => { page--; renderDevices(); });
    $("next").addEventListener("click", () => { page++; renderDevices(); });
    document.querySelector("#devices tbody").addEventListener("click", (ev) => {
      const b = ev.target.closest("[data-open]"); if (b) openDetail(b.dataset.open);
    });
    $("detail").addEventListener("close", () => { delete $("detail").dataset.device; });
    refresh();
    connect();
  });
})();
