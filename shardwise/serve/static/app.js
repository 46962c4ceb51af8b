// The planner page: the form's fields are the URL's query (shareable), each change asks
// /api/plan, which runs `shardwise plan` on them; errors come back as the CLI's one line.
const FIELDS = ["model", "config", "gpu", "gpus", "gpus_per_node", "tp", "pp", "zero", "mbs", "recompute", "gbs", "seq"];
const $ = (id) => document.getElementById(id);
const GiB = (b) => (b / 2 ** 30).toFixed(2) + " GiB";
let formats = [];

function query() {
  const q = new URLSearchParams();
  for (const f of FIELDS) { const v = $(f).value.trim(); if (v) q.set(f, v); }
  if ($("compile").checked) q.set("compile", "1");
  return q;
}

function cell(tr, text) { const td = document.createElement("td"); td.textContent = text; tr.appendChild(td); }

function rows(tbody, items, fn) {
  tbody.replaceChildren();
  for (const it of items) { const tr = document.createElement("tr"); fn(tr, it); tbody.appendChild(tr); }
}

function schedule(p, m, gpipe) {
  // each stage's order of work: GPipe all forwards then all backwards; 1F1B warms up with
  // p-1-s forwards, then alternates one forward and one backward, then drains the backwards
  const order = [];
  for (let s = 0; s < p; s++) {
    const o = [], w = gpipe ? m : Math.min(p - 1 - s, m);
    for (let k = 0; k < w; k++) o.push(["F", k]);
    for (let k = w; k < m; k++) { o.push(["F", k]); o.push(["B", k - w]); }
    for (let k = gpipe ? 0 : m - w; k < m; k++) o.push(["B", k]);
    order.push(o);
  }
  // start times: after the stage's previous work and the neighbour it depends on (backward = 2 forwards)
  const done = {}, free = new Array(p).fill(0), next = new Array(p).fill(0), out = [];
  for (let left = p * 2 * m, rounds = 0; left > 0 && rounds < 4 * p * m + 4; rounds++) {
    for (let s = 0; s < p; s++) {
      if (next[s] >= order[s].length) continue;
      const [kind, k] = order[s][next[s]];
      const dep = kind === "F" ? (s === 0 ? 0 : done["F" + (s - 1) + "," + k])
        : (s === p - 1 ? done["F" + s + "," + k] : done["B" + (s + 1) + "," + k]);
      if (dep === undefined) continue;
      const t0 = Math.max(free[s], dep), t1 = t0 + (kind === "F" ? 1 : 2);
      done[kind + s + "," + k] = t1; free[s] = t1; next[s]++; left--;
      out.push({ s, kind, k, t0, len: t1 - t0 });
    }
  }
  return out;
}

function timeline(plan) {
  const m = Math.min(plan.grad_accum, 8), work = schedule(plan.pp, m, plan.schedule === "gpipe"), traces = [];
  for (const [kind, name, color] of [["F", "forward", "#4c78a8"], ["B", "backward", "#f58518"]]) {
    const w = work.filter((x) => x.kind === kind);
    traces.push({ type: "bar", orientation: "h", name, x: w.map((x) => x.len), base: w.map((x) => x.t0),
      y: w.map((x) => "stage " + x.s), text: w.map((x) => String(x.k)), marker: { color } });
  }
  Plotly.react("timeline", traces, { barmode: "overlay", margin: { t: 10, l: 70 },
    xaxis: { title: `time in forward passes (${m} of ${plan.grad_accum} micro-batches shown)` },
    yaxis: { autorange: "reversed" } }, { displayModeBar: false, staticPlot: true });
}

async function refresh() {
  const q = query();
  history.replaceState(null, "", "?" + q.toString());
  const r = await fetch("/api/plan?" + q.toString());
  const d = await r.json();
  if (d.error || !d.recommended) {
    $("error").textContent = d.error || (d.what_it_would_take || []).join("; ") || "no plan fits";
    $("error").hidden = false; $("result").hidden = true; return;
  }
  $("error").hidden = true; $("result").hidden = false;
  const e = d.recommended, p = e.plan;
  $("recommended").textContent = d.equivalent.plans[0].short;
  $("summary").textContent = `${Math.round(e.time.tokens_per_s).toLocaleString()} tokens/s · MFU ${(100 * e.time.mfu).toFixed(1)}% · `
    + `${GiB(e.memory.total)} of ${GiB(e.memory.capacity)} per GPU · ${d.cluster.gpus}x ${d.cluster.gpu}`;
  $("command").textContent = e.command_line;
  $("exports").replaceChildren(...formats.map((f) => {
    const a = document.createElement("a"); a.href = `/api/export/${f}?` + q.toString(); a.textContent = "export " + f;
    a.id = "export-" + f; a.setAttribute("download", ""); return a;
  }));
  rows($("equivalent").tBodies[0], d.equivalent.plans.slice(0, 10), (tr, x) => {
    cell(tr, x.rank); cell(tr, x.short); cell(tr, Math.round(x.tokens_per_s).toLocaleString()); cell(tr, GiB(x.memory_total));
  });
  const m = e.memory, parts = ["params", "grads", "optimizer", "activations", "buffers", "overhead"];
  Plotly.react("memory", [{ type: "bar", x: parts, y: parts.map((k) => m[k] / 2 ** 30), marker: { color: "#4c78a8" } }],
    { margin: { t: 10 }, yaxis: { title: "GiB" } }, { displayModeBar: false, staticPlot: true });
  rows($("comm").tBodies[0], e.comm, (tr, c) => {
    cell(tr, c.kind); cell(tr, c.group); cell(tr, c.ranks); cell(tr, (c.bytes / 1e6).toFixed(1) + " MB"); cell(tr, c.count);
    cell(tr, (1000 * c.seconds).toFixed(1) + " ms"); cell(tr, c.what);
  });
  timeline(p);
}

async function start() {
  const c = await (await fetch("/api/choices")).json();
  formats = c.formats;
  $("model").replaceChildren(...c.models.map((n) => new Option(n, n)));
  $("gpu").replaceChildren(...c.gpus.map((n) => new Option(n, n)));
  $("model").value = "llama-3.1-8b"; $("gpu").value = "h100-80gb";
  const q = new URLSearchParams(location.search);
  for (const f of FIELDS) if (q.has(f)) $(f).value = q.get(f);
  $("compile").checked = q.get("compile") === "1";
  $("form").addEventListener("change", refresh);
  $("upload").addEventListener("change", async (ev) => { $("config").value = await ev.target.files[0].text(); refresh(); });
  await refresh();
}
start();
