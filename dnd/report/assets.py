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
.card h3{margin:0 0 4px;font-size:15px}
.card .l2{color:#666;font-size:13px}
.card .nums{font-size:12px;color:#444;margin:4px 0}
.thumbs{display:flex;gap:3px}
.thumbs img{width:58px;height:58px;object-fit:cover;background:#eee}
.err{color:#b52b27;white-space:pre-wrap}
.imgs{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:12px}
figure img{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.boxed{position:relative;width:240px}
.boxed img{width:240px;height:auto;display:block}
.boxed svg{position:absolute;left:0;top:0;width:100%;height:100%}
.boxed rect{fill:none;stroke:#ff1744;stroke-width:3;vector-effect:non-scaling-stroke}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left}
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
    count=document.getElementById('count');
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;
  if(text!==undefined)e.textContent=text;return e;}
function fmt(x){return x===null||x===undefined?'-':Number(x).toFixed(3);}
function card(u){
  var a=el('a','card'+(u.error?' failed':''));a.href=u.href;a.dataset.unit=u.unit;
  a.appendChild(el('div','nums',u.layer+' #'+u.unit));
  a.appendChild(el('h3','label',u.labels.length?u.labels[0]:(u.error?'failed':'(no label)')));
  if(u.labels.length>1)a.appendChild(el('div','l2',u.labels.slice(1).join(' \\u00b7 ')));
  if(u.error)a.appendChild(el('div','err',u.error));
  a.appendChild(el('div','nums','score '+fmt(u.score)+' \\u00b7 interpretability '+
    fmt(u.interp)));
  var t=el('div','thumbs');
  u.thumbs.forEach(function(src){var i=el('img');i.loading='lazy';i.src=src;i.alt='';
    t.appendChild(i);});
  a.appendChild(t);return a;}
function key(u,k){var v=u[k];return v===null||v===undefined?-Infinity:v;}
function render(){
  var text=q.value.trim().toLowerCase(),layer=layerSel.value,s=sortSel.value;
  var shown=units.filter(function(u){
    return (!layer||u.layer===layer)&&
      (!text||u.labels.join(' | ').toLowerCase().indexOf(text)>=0);});
  shown.sort(function(a,b){
    if(s==='unit')return a.layer<b.layer?-1:a.layer>b.layer?1:a.unit-b.unit;
    return key(b,s)-key(a,s);});
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
[sortSel,layerSel].forEach(function(e){e.addEventListener('change',render);});
render();
})();
"""
