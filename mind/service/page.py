"""``GET /``: one self-contained HTML page (no external assets) to try the service from a browser.

Type raw item ids, or search the catalogue by title and click an item to add it to the history;
"Recommend" posts to ``/recommend`` and shows the merged list and, beside it, each active interest
with the items of the list it scores best (the ``interest`` field of the answer).  The query string
``?history=1,2,3&n=10&merge=max`` fills the form and runs at once (the headless-Chromium test uses it).
When a run has finished, ``<body data-state>`` is ``done`` (or ``error``, with the reason in #status).
"""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MIND recall service</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222;background:#fafafa}
 h1{font-size:20px;margin:0 0 4px} .muted{color:#666} input,select,button{font:inherit;padding:4px 6px}
 #history{width:28em} #search{width:18em} .row{margin:8px 0}
 .chip{display:inline-block;background:#e6eefc;border-radius:10px;padding:1px 8px;margin:2px;cursor:pointer}
 #found div{cursor:pointer;padding:1px 4px} #found div:hover{background:#eef}
 #out{display:flex;gap:18px;align-items:flex-start;margin-top:12px;flex-wrap:wrap}
 table{border-collapse:collapse;background:#fff} td,th{border-bottom:1px solid #ddd;padding:2px 8px;text-align:left}
 .interest{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 10px;min-width:14em}
 .i0{border-top:4px solid #1f77b4}.i1{border-top:4px solid #ff7f0e}.i2{border-top:4px solid #2ca02c}
 .i3{border-top:4px solid #d62728}.i4{border-top:4px solid #9467bd}.i5{border-top:4px solid #8c564b}
 #status.err{color:#b00}
</style></head>
<body data-state="idle">
<h1>MIND recall service</h1>
<div id="model" class="muted">loading model...</div>
<div class="row"><label>history (raw item ids, oldest first)
 <input id="history" placeholder="e.g. 50,172,181"></label>
 <label>n <input id="n" type="number" value="10" min="1" style="width:5em"></label>
 <label>merge <select id="merge"><option value="">(default)</option><option>max</option><option>quota</option>
 <option>diverse</option></select></label>
 <label>diversity <input id="diversity" type="number" step="0.1" min="0" style="width:5em"></label>
 <button id="go">Recommend</button></div>
<div class="row"><label>pick from the catalogue <input id="search" placeholder="title, e.g. star wars"></label>
 <div id="found"></div></div>
<div id="chips" class="row"></div>
<div id="status" class="row muted"></div>
<div id="out"></div>
<script>
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const ids = () => $("history").value.split(",").map((s) => s.trim()).filter((s) => s.length);
function chips() {
  $("chips").innerHTML = ids().map((id, i) => `<span class="chip" data-i="${i}" title="remove">${esc(id)} &times;</span>`).join("");
}
$("chips").onclick = (e) => { const i = e.target.dataset.i; if (i === undefined) return;
  const h = ids(); h.splice(Number(i), 1); $("history").value = h.join(","); chips(); };
$("history").oninput = chips;
let timer = null;
$("search").oninput = () => { clearTimeout(timer); timer = setTimeout(async () => {
  const q = $("search").value.trim(); if (!q) { $("found").innerHTML = ""; return; }
  const r = await fetch(`/catalogue?limit=12&q=${encodeURIComponent(q)}`); const j = await r.json();
  $("found").innerHTML = (j.items || []).map((it) => `<div data-id="${esc(it.id)}">[${esc(it.id)}] ${esc(it.title)}</div>`).join("");
}, 150); };
$("found").onclick = (e) => { const id = e.target.dataset.id; if (id === undefined) return;
  $("history").value = ids().concat([id]).join(","); chips(); };
async function run() {
  document.body.dataset.state = "running"; $("status").className = "row muted"; $("status").textContent = "asking...";
  const body = {history: ids(), n: Number($("n").value || 10)};
  if ($("merge").value) body.merge = $("merge").value;
  if ($("diversity").value !== "") body.diversity = Number($("diversity").value);
  const t0 = performance.now();
  let j;
  try {
    const r = await fetch("/recommend", {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)});
    j = await r.json();
    if (!r.ok) throw new Error(`${r.status}: ${j.error}`);
  } catch (err) {
    $("status").className = "row err"; $("status").textContent = String(err.message || err);
    $("out").innerHTML = ""; document.body.dataset.state = "error"; return;
  }
  const ms = (performance.now() - t0).toFixed(1);
  $("status").textContent = `${j.items.length} items from ${j.interests} interest(s), model ${j.model}, ${ms} ms` +
    (j.dropped ? `, ${j.dropped} unknown id(s) dropped` : "");
  const rows = j.items.map((it, r) => `<tr class="item" data-id="${esc(it.id)}"><td>${r + 1}</td><td>${esc(it.id)}</td>` +
    `<td>${esc(it.title)}</td><td>${it.score === null ? "" : it.score.toFixed(3)}</td><td>${it.interest}</td></tr>`).join("");
  let html = `<div><b>merged list</b><table id="merged"><tr><th>#</th><th>id</th><th>title</th><th>score</th><th>interest</th></tr>${rows}</table></div>`;
  const by = {};
  j.items.forEach((it) => { (by[it.interest] = by[it.interest] || []).push(it); });
  Object.keys(by).sort((a, b) => a - b).forEach((k) => {
    html += `<div class="interest i${k % 6}" data-interest="${k}"><b>interest ${k}</b> (${by[k].length})<ol>` +
      by[k].map((it) => `<li>${esc(it.title)} <span class="muted">${it.score.toFixed(3)}</span></li>`).join("") + "</ol></div>";
  });
  $("out").innerHTML = html; document.body.dataset.state = "done";
}
$("go").onclick = run;
$("history").onkeydown = (e) => { if (e.key === "Enter") run(); };
(async () => {
  try { const r = await fetch("/readyz"); const j = await r.json();
    $("model").textContent = r.ok ? `model ${j.model}: ${j.items} items, ${j.num_interests} interests, ${j.format}, index ${j.index}` : `not ready: ${j.error || j.status}`;
  } catch (err) { $("model").textContent = "service unreachable"; }
  const p = new URLSearchParams(location.search);
  if (p.get("n")) $("n").value = p.get("n");
  if (p.get("merge")) $("merge").value = p.get("merge");
  if (p.get("diversity")) $("diversity").value = p.get("diversity");
  if (p.get("history")) { $("history").value = p.get("history"); chips(); await run(); }
})();
</script>
</body></html>
"""
