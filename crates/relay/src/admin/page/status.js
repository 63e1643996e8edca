(function(){
"use strict";
var q=document.getElementById("q"),h=document.getElementById("h"),shown=document.getElementById("shown");
var rows=[],texts=[],timer=0;
function index(){
  rows=Array.prototype.slice.call(document.querySelectorAll("#rows>tbody>tr,#stream-groups>tbody>tr,#graph-rows>tbody>tr"));
  texts=rows.map(function(r){return r.textContent.toLowerCase();});
}
function apply(){
  var needle=q.value.trim().toLowerCase(),want=h.value,n=0;
  for(var i=0;i<rows.length;i++){
    var c=rows[i].className;
    var ok=(!want||c===want||(want==="problems"&&c!=="green"))&&(!needle||texts[i].indexOf(needle)>=0);
    if(rows[i].hidden===ok){rows[i].hidden=!ok;}
    if(ok){n++;}
  }
  shown.textContent=rows.length?("showing "+n+" of "+rows.length):"";
}
function remember(){
  var p=[];
  if(q.value){p.push("q="+encodeURIComponent(q.value));}
  if(h.value){p.push("h="+encodeURIComponent(h.value));}
  history.replaceState(null,"",p.length?"#"+p.join("&"):location.pathname+location.search);
}
function changed(){clearTimeout(timer);timer=setTimeout(function(){apply();remember();},120);}
location.hash.replace(/^#/,"").split("&").forEach(function(kv){
  var i=kv.indexOf("=");if(i<0){return;}
  var k=kv.slice(0,i),v=decodeURIComponent(kv.slice(i+1));
  if(k==="q"){q.value=v;}else if(k==="h"){h.value=v;}
});
q.addEventListener("input",changed);
h.addEventListener("change",changed);
document.getElementById("filter").hidden=false;
index();apply();
function refresh(){
  if(document.hidden){return;}
  fetch(location.pathname,{cache:"no-store",credentials:"same-origin"}).then(function(r){
    if(!r.ok){throw new Error("HTTP "+r.status);}
    return r.text();
  }).then(function(text){
    var doc=new DOMParser().parseFromString(text,"text/html");
    ["live-top","live-rows"].forEach(function(id){
      var fresh=doc.getElementById(id),old=document.getElementById(id);
      if(fresh&&old){old.replaceWith(document.importNode(fresh,true));}
    });
    document.title=doc.title;
    var root=document.documentElement;
    root.removeAttribute("data-stale");
    root.setAttribute("data-refreshes",String(+(root.getAttribute("data-refreshes")||0)+1));
    index();apply();
  }).catch(function(){document.documentElement.setAttribute("data-stale","");});
}
setInterval(refresh,(+document.documentElement.getAttribute("data-refresh")||10)*1000);
document.documentElement.setAttribute("data-js","on");
})();
