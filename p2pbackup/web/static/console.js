// p2pbackup console: live status over server-sent events, restores with progress.
// No framework, no build step, nothing loaded from elsewhere.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function size(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function ago(seconds) {
  if (!seconds) return "never";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function renderStatus(st) {
  const box = document.getElementById("status");
  if (!box) return;
  const rows = [];
  rows.push(el("p", {}, `p2pbackupd is running (pid ${st.pid}), device ${st.device.slice(0, 12)}`));
  if (st.paused_for) {
    rows.push(el("p", {class: "warn"}, `paused: ${st.paused_for.command} writes the store; ` +
      "changes are captured when it ends"));
  }
  const activity = el("ul", {id: "activity"});
  if (st.log) {
    activity.append(el("li", {}, `log: segment ${st.log.seq}, sealed ${ago(st.log.last_sealed)}; ` +
      `${st.log.pending_changes} changes pending`));
  }
  const last = st.last_snapshot;
  activity.append(el("li", {}, "last snapshot: " +
    (last && last.id ? `${last.id.slice(0, 8)}, ${ago(last.time)}` : "none")));
  for (const s of st.sources || []) {
    activity.append(el("li", {}, `source ${s.name}: ${s.path}` + (s.present ? "" : " (missing)")));
  }
  rows.push(activity);
  rows.push(el("h2", {}, "Now"));
  rows.push(renderWork(st.activities || [], st.peers || []));
  const peers = el("ul", {id: "peers"});
  for (const p of st.peers || []) {
    const where = p.connected ? `connected over the ${route(p)}` :
      (p.on_lan ? "on the LAN, not connected" : "offline");
    let extra = "";
    if (p.objects_behind) extra += `; ${p.objects_behind} objects (${size(p.bytes_behind || 0)}) behind`;
    if (p.last_sync) extra += `; last sync ${ago(p.last_sync)}`;
    if (p.error) extra += `; ${p.error}`;
    peers.append(el("li", {class: p.connected ? "online" : "offline"},
      `${p.name || "?"} (${p.device.slice(0, 12)}): ${where}${extra}`));
  }
  rows.push(el("h2", {}, "Devices and partners"));
  rows.push(st.peers && st.peers.length ? peers : el("p", {class: "muted"},
    st.lan && !st.lan.enabled ? "LAN discovery is off" : "no other devices paired"));
  if (st.broker) {
    const b = st.broker;
    rows.push(el("p", {id: "broker", class: b.connected ? "online" : "offline"},
      `broker ${b.url}: ` + (b.connected ? "connected" :
        "not connected" + (b.last_error ? ` (${b.last_error})` : ""))));
  }
  if (st.stores && st.stores.length) {
    rows.push(el("h2", {}, "Stores"));
    const ul = el("ul", {id: "stores"});
    for (const s of st.stores) {
      let text = `${s.location}: ` + (s.reachable === false ? "not reachable" :
        (s.reachable ? "reachable" : "not tried yet"));
      text += s.objects_behind ? `; ${s.objects_behind} objects (${size(s.bytes_behind)}) to upload` :
        "; up to date";
      if (s.last_upload) text += `; last upload ${ago(s.last_upload)}`;
      if (s.last_error) text += `; ${s.last_error}`;
      ul.append(el("li", {class: s.last_error ? "error" : ""}, text));
    }
    rows.push(ul);
  }
  for (const g of st.partner_for || []) {
    rows.push(el("p", {}, `storage partner for account ${g.account}: ${size(g.used)} used`));
  }
  // Damage `verify` or a read noted (as `status` says it): a person should see it here first.
  const errors = (st.damaged || []).map(d => `damaged: pack ${d.pack.slice(0, 12)}: ${d.reason} ` +
    "(an intact copy from a peer replaces it; Repair heals it or sets it aside)")
    .concat(st.errors || []);
  rows.push(el("h2", {}, "Warnings"));
  if (errors.length) {
    const ul = el("ul", {id: "errors"});
    for (const e of errors) ul.append(el("li", {class: "error"}, e));
    rows.push(ul);
  } else {
    rows.push(el("p", {class: "muted"}, "none"));
  }
  box.replaceChildren(...rows);
}

// How a data channel crosses the network, as p2pbackup.views.peer_route says it.
const ICE_PATH = {host: "LAN", reflexive: "hole punched", relay: "TURN relay"};

function route(p) {
  const path = p.path || "data channel";
  const words = ICE_PATH[p.ice_path] || p.ice_path;
  const route = words && path === "data channel" ? `${path} (${words})` : path;
  return route + (p.signaled === "broker" ? ", signaled through the broker" : "");
}

const WORK = {snapshot: "snapshot of", seal: "sealing the log segment", replication:
  "replication with", upload: "upload to"};

// What the daemon is doing now (status.activities), a bar each where the end is known.
function renderWork(activities, peers) {
  const names = Object.fromEntries(peers.map((p) => [p.device, p.name || p.device.slice(0, 12)]));
  const busy = activities.filter((a) => a.phase !== "idle");
  if (!busy.length) return el("p", {id: "work", class: "muted"}, "idle");
  const ul = el("ul", {id: "work"});
  for (const a of busy) {
    const who = a.kind === "replication" ? names[a.name] || a.name.slice(0, 12) : a.name;
    let text = `${WORK[a.kind] || a.kind} ${who || ""}`.trim() + (a.phase ? `: ${a.phase}` : "");
    const li = el("li", {class: "work", "data-kind": a.kind});
    if (a.total) {
      const pct = Math.min(100, Math.round(100 * a.done / a.total));
      text += ` ${pct}% (${size(a.done)} of ${size(a.total)})`;
      li.append(el("progress", {max: String(a.total), value: String(Math.min(a.done, a.total))}),
        " ");
    } else if (a.done) {
      text += ` (${size(a.done)})`;
    }
    if (a.kind === "replication") {
      text += `; sent ${a.sent_objects} objects (${size(a.sent_bytes)}), received ` +
        `${a.received_objects} (${size(a.received_bytes)})`;
    }
    if (a.files !== undefined) text += `; ${a.files} files`;
    li.append(text);
    ul.append(li);
  }
  return ul;
}

function progressText(j) {
  const pct = j.expected_bytes ? Math.min(100, Math.round(100 * j.bytes / j.expected_bytes)) : 0;
  const what = j.files !== undefined ? `${j.files} files, ` :
    (j.total_packs ? `${j.packs} of ${j.total_packs} packs, ` : "");
  return `${pct}% (${what}${size(j.bytes)})`;
}

function renderJobs(jobs) {
  const box = document.getElementById("jobs");
  if (box && jobs.length) {
    const ul = el("ul", {});
    for (const j of jobs.slice().reverse()) {
      const text = j.state === "running" ? progressText(j) : j.result;
      ul.append(el("li", {class: "job " + j.state, "data-job": String(j.id)},
        `${j.kind} ${j.what}: ${j.state} — ${text}`));
    }
    box.replaceChildren(ul);
  }
  for (const id of ["restore-state", "verify-state"]) followJob(jobs, id);
}

function followJob(jobs, id) {
  const state = document.getElementById(id);
  const waiting = state && state.dataset.job;
  if (waiting) {
    const j = jobs.find((x) => String(x.id) === waiting);
    if (j) {
      state.textContent = j.state === "running" ? `${j.kind}: ${progressText(j)}` :
        `${j.state}: ${j.result}`;
      state.className = "job " + j.state;
    }
  }
}

function listen() {
  const source = new EventSource("/api/events");
  source.addEventListener("status", (ev) => {
    const news = JSON.parse(ev.data);
    renderStatus(news.status);
    renderJobs(news.jobs);
  });
}

async function post(url, body) {
  const r = await fetch(url, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
    body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function setupRestore() {
  const dialog = document.getElementById("restore-dialog");
  if (!dialog) return;
  let chosen = null;
  for (const b of document.querySelectorAll("button.restore")) {
    b.addEventListener("click", () => {
      chosen = b.dataset;
      document.getElementById("restore-what").textContent = chosen.path;
      const state = document.getElementById("restore-state");
      state.textContent = "";
      delete state.dataset.job;
      dialog.showModal();
    });
  }
  document.getElementById("restore-go").addEventListener("click", async (ev) => {
    ev.preventDefault();
    const to = document.getElementById("restore-to").value.trim();
    const state = document.getElementById("restore-state");
    if (!to) { state.textContent = "give a folder"; return; }
    try {
      const got = await post("/api/restore", {snapshot: chosen.snapshot, path: chosen.path,
        at: chosen.at, to, overwrite: document.getElementById("restore-overwrite").checked});
      state.dataset.job = String(got.job);
      state.textContent = "restoring…";
    } catch (e) {
      state.textContent = "refused: " + e.message;
      state.className = "job failed";
    }
  });
}

function setupDevices() {
  for (const b of document.querySelectorAll("button.remove")) {
    b.addEventListener("click", async () => {
      const state = document.getElementById("remove-state");
      if (!window.confirm(`Remove ${b.dataset.name}? It is refused from now on and new ` +
                          "data uses keys it never had.")) return;
      try {
        const r = await post("/api/devices/remove", {device: b.dataset.device});
        state.className = "done";
        state.textContent = `removed ${r.removed.name}; key epoch is now ${r.key_epoch}. ` +
          `Write down the new recovery code (it opens everything): ${r.recovery_code}`;
        b.closest("tr").remove();
      } catch (e) {
        state.className = "error";
        state.textContent = "not removed: " + e.message;
      }
    });
  }
  const start = document.getElementById("pair-start");
  if (!start) return;
  const cancel = document.getElementById("pair-cancel");
  let shown = null;  // the code on the page while its pairing runs
  const withdraw = () => {
    // keepalive: still sent when the page is going away (the server also withdraws a code
    // whose page stopped waiting).
    if (shown) fetch("/api/pair/cancel", {method: "POST", credentials: "same-origin",
      keepalive: true, headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify({code: shown})}).catch(() => {});
  };
  window.addEventListener("pagehide", withdraw);
  cancel.addEventListener("click", withdraw);
  const roles = document.querySelectorAll('input[name="pair-role"]');
  const chosenRole = () => document.querySelector('input[name="pair-role"]:checked').value;
  const showRoleFields = () => {
    document.getElementById("pair-sources").hidden = chosenRole() !== "member";
    document.getElementById("pair-quota-box").hidden = chosenRole() !== "partner";
  };
  for (const r of roles) r.addEventListener("change", showRoleFields);
  showRoleFields();  // (a reload keeps the choice)
  const asked = () => {
    const role = chosenRole();
    if (role === "member") {
      return {role, sources: Array.from(
        document.querySelectorAll('input[name="pair-source"]:checked'), (c) => c.value)};
    }
    if (role === "partner") return {role, quota: document.getElementById("pair-quota").value};
    return {role};
  };
  start.addEventListener("click", async () => {
    const box = document.getElementById("pair");
    const state = document.getElementById("pair-state");
    const question = document.getElementById("pair-question");
    box.hidden = false;
    start.disabled = true;
    for (const r of roles) r.disabled = true;
    state.className = "";
    state.textContent = "";
    document.getElementById("pair-code").textContent = "";
    document.getElementById("pair-qr").removeAttribute("src");
    try {
      const p = await post("/api/pair/start", asked());
      shown = p.code;
      cancel.hidden = false;
      document.getElementById("pair-code").textContent = p.code +
        (p.lan === false ? ` --peer 127.0.0.1:${p.port}` : "");
      document.getElementById("pair-qr").src = p.qr;
      state.textContent = `waiting for the new device, to join as ${p.role} (the code ` +
        `works once, for ${Math.round(p.expires_in / 60)} minutes)…`;
      let got = await post("/api/pair/wait", {code: p.code, questions: true});
      if (got.state === "question") {
        // Held open while the question is asked: closing the page withdraws the code.
        const ending = post("/api/pair/wait", {code: p.code});
        document.getElementById("pair-verifier").textContent = got.verifier;
        question.hidden = false;
        state.textContent = `${got.name} proved the code and asks to join as ${got.role}`;
        const accept = await Promise.race([ending.then(() => null), new Promise((resolve) => {
          document.getElementById("pair-yes").onclick = () => resolve(true);
          document.getElementById("pair-no").onclick = () => resolve(false);
        })]);
        question.hidden = true;
        if (accept !== null) await post("/api/pair/answer", {code: p.code, accept});
        got = await ending;
      }
      state.className = got.ok ? "done" : "failed";
      state.textContent = (got.ok ? "paired: " : "not paired: ") + got.message;
    } catch (e) {
      state.className = "failed";
      state.textContent = "pairing failed: " + e.message;
    } finally {
      shown = null;
      cancel.hidden = true;
      start.disabled = false;
      for (const r of roles) r.disabled = false;
    }
  });
}

function setupVerify() {
  for (const b of document.querySelectorAll("button.verify, button.repair")) {
    b.addEventListener("click", async () => {
      const state = document.getElementById("verify-state");
      const repair = b.classList.contains("repair");
      try {
        const got = repair ? await post("/api/repair", {}) :
          await post("/api/verify", {read_data: b.dataset.read === "true"});
        state.dataset.job = String(got.job);
        state.className = "job running";
        state.textContent = (repair ? "repair" : "verify") + ": starting…";
      } catch (e) {
        state.className = "job failed";
        state.textContent = "refused: " + e.message;
      }
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  listen();
  setupRestore();
  setupDevices();
  setupVerify();
});
