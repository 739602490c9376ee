"""The page at ``/``: what is served (model, backend, sparsity, batching), live figures, a prompt box that streams."""

from __future__ import annotations

import html
import json
from typing import Any

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>strataprune serve: __MODEL__</title>
<style>
body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:rgb(34,34,34)}
table{border-collapse:collapse}td{padding:.15rem .8rem .15rem 0;vertical-align:top}
textarea{width:100%;height:6rem}pre{white-space:pre-wrap;background:#f4f4f4;padding:.6rem;min-height:3rem}
.k{color:gray}
</style></head><body>
<h1>strataprune serve</h1>
<table id="facts">__FACTS__</table>
<h2>Live</h2><table id="live"></table>
<h2>Try it</h2>
<p><label><input type="checkbox" id="chat"> chat template</label>
 max_tokens <input id="max" type="number" value="64" min="1" style="width:5rem">
 temperature <input id="temp" type="number" value="0" min="0" max="2" step="0.1" style="width:4rem">
 API key <input id="key" type="password" style="width:10rem"></p>
<textarea id="prompt">The quick brown fox</textarea>
<p><button id="go">Generate (streams)</button> <span id="stat" class="k"></span></p>
<pre id="out"></pre>
<script>
const MODEL = __MODEL_JSON__;
async function live(){
  try{
    const h = await (await fetch('/health')).json();
    const keys = ['status','running','waiting','max_batch_seen','kv_cache_bytes','kv_cache_bound_bytes'];
    document.getElementById('live').innerHTML = keys.filter(k => k in h)
      .map(k => `<tr><td class="k">${k}</td><td>${h[k]}</td></tr>`).join('');
  }catch(e){}
}
setInterval(live, 1000); live();
document.getElementById('go').onclick = async () => {
  const chat = document.getElementById('chat').checked, out = document.getElementById('out');
  const stat = document.getElementById('stat'), text = document.getElementById('prompt').value;
  const body = {model: MODEL, stream: true, max_tokens: +document.getElementById('max').value,
                temperature: +document.getElementById('temp').value};
  if (chat) body.messages = [{role: 'user', content: text}]; else body.prompt = text;
  const headers = {'Content-Type': 'application/json'}, key = document.getElementById('key').value;
  if (key) headers.Authorization = 'Bearer ' + key;
  out.textContent = ''; stat.textContent = 'waiting'; const t0 = performance.now(); let first = null;
  const r = await fetch(chat ? '/v1/chat/completions' : '/v1/completions', {method: 'POST', headers, body: JSON.stringify(body)});
  if (!r.ok) { out.textContent = await r.text(); stat.textContent = 'HTTP ' + r.status; return; }
  const reader = r.body.getReader(), dec = new TextDecoder(); let buf = '';
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true}); let i;
    while ((i = buf.indexOf('\\n\\n')) >= 0) {
      const line = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
      const c = JSON.parse(line.slice(6));
      if (c.error) { out.textContent += '\\n[error] ' + c.error.message; continue; }
      const ch = c.choices[0]; const piece = chat ? (ch.delta.content || '') : ch.text;
      if (piece && first === null) first = performance.now();
      out.textContent += piece;
      const ttft = ((first ?? performance.now()) - t0).toFixed(0);
      if (c.usage) stat.textContent = `${c.usage.completion_tokens} tokens, first after ${ttft} ms, ` +
        `${((performance.now() - t0) / 1000).toFixed(2)} s in all (${ch.finish_reason})`;
    }
  }
};
</script></body></html>
"""


def render_page(state: Any) -> str:
    model = state.model
    rows: dict[str, Any] = {"status": state.status}
    if model is not None:
        rows.update({"model": model.model_id, "backend": model.backend, "batching": model.batching_note})
        rows.update({"context length": model.context_length})
        rows.update({k.replace("_", " "): v for k, v in model.info.facts().items() if v is not None})
    facts = "".join(f'<tr><td class="k">{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>' for k, v in rows.items())
    model_id = model.model_id if model is not None else ""
    return (
        PAGE.replace("__FACTS__", facts)
        .replace("__MODEL_JSON__", json.dumps(model_id).replace("<", "\\u003c"))
        .replace("__MODEL__", html.escape(model_id))
    )
