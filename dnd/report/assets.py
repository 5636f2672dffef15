"""Inline CSS and JS of the report: no CDN, no fonts, so pages work offline from file://."""

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f6f6f4;
color:#222}
header{background:#263238;color:#fff;padding:10px 16px}
header a{color:#cfe}
main{padding:12px 16px}
.controls{display:flex;gap:10px;flex-wrap:wrap;margin:0 0 12px}
.controls input,.controls select{padding:4px 6px;font-size:14px}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;color:inherit;
text-decoration:none;display:block}
.card:hover{border-color:#4a90d9}
.card.failed{border-color:#d9534f}
.card h3{margin:0 0 4px;font-size:15px;overflow-wrap:anywhere}
.card h3.pending{color:#777;font-weight:normal;font-style:italic}
.card.low{border-color:#ef6c00;border-width:2px}
.card .l2{color:#666;font-size:13px}
.card .nums{font-size:12px;color:#444;margin:4px 0}
.thumbs{display:flex;gap:3px}
.thumbs img{width:58px;height:58px;object-fit:cover;background:#eee}
.err{color:#b52b27;white-space:pre-wrap;overflow-wrap:anywhere}
.card .err{font-size:12px;white-space:normal}
.note{background:#fff;border-left:4px solid #90a4ae;padding:6px 10px}
.lowwarn{background:#fff3e0;border-left:4px solid #ef6c00;padding:6px 10px}
.fallback-badge{display:inline-block;background:#6a1b9a;color:#fff;border-radius:3px;
padding:0 5px;font-size:11px;margin-left:4px}
.low-badge{display:inline-block;background:#ef6c00;color:#fff;border-radius:3px;
padding:0 5px;font-size:12px;margin-right:4px}
.muted{color:#666}
.imgs{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:12px;overflow-wrap:anywhere}
figure.top{width:250px}
figure.fv img{image-rendering:pixelated}
table.textvis{border-collapse:collapse}
table.textvis td,table.textvis th{padding:2px 8px;text-align:left}
figure img{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.boxed{position:relative;width:240px}
.boxed img{width:240px;height:auto;display:block}
.boxed svg{position:absolute;left:0;top:0;width:100%;height:100%}
.boxed rect{fill:none;stroke:#ff1744;stroke-width:3;vector-effect:non-scaling-stroke}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left;
overflow-wrap:anywhere}
tr.winner{background:#e8f5e9}
.gen img{width:48px;height:48px;margin:1px}
.why{background:#fff;border-left:4px solid #43a047;padding:6px 10px}
.cmp{border-collapse:collapse}.cmp td.ok{background:#d8f5dc}
.cmp td,.cmp th{border:1px solid #ccc;padding:3px 6px;font-size:13px}
"""

# Cards are built with textContent only: model text never reaches innerHTML.
INDEX_JS = """
(function(){
var units=JSON.parse(document.getElementById('units-data').textContent);
var grid=document.getElementById('grid'),q=document.getElementById('q'),
    sortSel=document.getElementById('sort'),layerSel=document.getElementById('layer'),
    lowOnly=document.getElementById('lowonly'),count=document.getElementById('count');
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;
  if(text!==undefined)e.textContent=text;return e;}
function fmt(x){return x===null||x===undefined?'-':Number(x).toFixed(3);}
function card(u){
  var a=el('a','card'+(u.error?' failed':'')+(u.low?' low':''));a.href=u.href;
  a.dataset.unit=u.unit;
  a.appendChild(el('div','nums',u.layer+' #'+u.unit));
  if(u.labels.length)a.appendChild(el('h3','label',u.labels[0]));
  else if(u.error)a.appendChild(el('h3','label pending','failed at '+(u.failed_at||'?')));
  else a.appendChild(el('h3','label pending',u.stage&&u.stage!=='labels'?
    'no label yet: stopped after '+u.stage:'(no label)'));
  if(u.labels.length>1)a.appendChild(el('div','l2',u.labels.slice(1).join(' \\u00b7 ')));
  if(u.error)a.appendChild(el('div','err',u.error+' (full error on the unit page)'));
  if(u.low)a.appendChild(el('span','low-badge','low interpretability'));
  if(u.fallback)a.appendChild(el('span','fallback-badge','fallback label'));
  // Only the numbers the unit has: a run stopped early has neither yet.
  var nums=[];
  if(has(u.score))nums.push('score '+fmt(u.score));
  if(has(u.confidence))nums.push('confidence '+fmt(u.confidence));
  if(has(u.interp))nums.push('interpretability '+fmt(u.interp));
  if(nums.length)a.appendChild(el('div','nums',nums.join(' \\u00b7 ')));
  var t=el('div','thumbs');
  u.thumbs.forEach(function(src){var i=el('img');i.loading='lazy';i.src=src;i.alt='';
    t.appendChild(i);});
  a.appendChild(t);return a;}
function has(v){return v!==null&&v!==undefined;}
function byUnit(a,b){return a.layer<b.layer?-1:a.layer>b.layer?1:a.unit-b.unit;}
// By a number, highest first (or lowest first when asc); units without it go last.
function byNum(k,asc){return function(a,b){var x=a[k],y=b[k];
  if(!has(x)||!has(y)||x===y)return has(x)===has(y)?byUnit(a,b):has(x)?-1:1;
  return (asc?x<y:x>y)?-1:1;};}
function render(){
  var text=q.value.trim().toLowerCase(),layer=layerSel.value,s=sortSel.value;
  var shown=units.filter(function(u){
    return (!layer||u.layer===layer)&&(!lowOnly.checked||u.low)&&
      (!text||u.labels.join(' | ').toLowerCase().indexOf(text)>=0);});
  shown.sort(s==='unit'?byUnit:s==='interp_low'?byNum('interp',true):byNum(s,false));
  grid.textContent='';
  var frag=document.createDocumentFragment();shown.forEach(function(u){
    frag.appendChild(card(u));});
  grid.appendChild(frag);
  count.textContent=shown.length+' of '+units.length+' units';}
Array.from(new Set(units.map(function(u){return u.layer;}))).forEach(function(l){
  var o=el('option',null,l);o.value=l;layerSel.appendChild(o);});
// Not 'change' on the search box: it fires on blur, and re-rendering there would swap the
// card under a click that is landing on it.
q.addEventListener('input',render);
[sortSel,layerSel,lowOnly].forEach(function(e){e.addEventListener('change',render);});
render();
})();
"""


def scoped_css(scope: str, extra: str = "") -> str:
    """:data:`CSS` (and ``extra`` rules) confined to the elements inside ``scope`` (a
    selector), for report HTML shown inside another page (a notebook's output): ``body``
    becomes ``scope`` itself, every other selector ``scope <selector>``. The rules are
    plain ``selectors{declarations}`` (no @-rules, no nesting)."""
    out = []
    for rule in (CSS + extra).split("}"):
        selectors, _, body = rule.partition("{")
        if not body.strip():
            continue
        scoped = [scope if s == "body" else f"{scope} {s}"
                  for s in (" ".join(part.split()) for part in selectors.split(","))]
        out.append(",".join(scoped) + "{" + " ".join(body.split()) + "}")
    return "\n".join(out)
