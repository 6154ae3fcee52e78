"use strict";(self.rspackChunkjupyter_aifab=self.rspackChunkjupyter_aifab||[]).push([["style_index_js"],{"./node_modules/css-loader/dist/cjs.js!./style/index.css"(e,t,r){var o=r("./node_modules/css-loader/dist/runtime/noSourceMaps.js"),a=r.n(o),n=r("./node_modules/css-loader/dist/runtime/api.js"),s=(r.n(n))()(a());s.push([e.id,`/* The AI factory panel and status bar: JupyterLab's own variables, so themes apply. */
.aifab-Panel {
  padding: 8px;
  overflow-y: auto;
  font-size: var(--jp-ui-font-size1);
  color: var(--jp-ui-font-color1);
  background: var(--jp-layout-color1);
}
.aifab-Title { font-size: var(--jp-ui-font-size2); margin: 0 0 6px; }
.aifab-Panel h3 { font-size: var(--jp-ui-font-size1); margin: 10px 0 4px; text-transform: uppercase; }
.aifab-Card {
  border: var(--jp-border-width) solid var(--jp-border-color2);
  border-radius: 4px;
  padding: 6px;
  margin-bottom: 6px;
}
.aifab-CardHead { display: flex; justify-content: space-between; font-weight: bold; }
.aifab-State-ready { color: var(--jp-success-color1); }
.aifab-State-starting, .aifab-State-stopping { color: var(--jp-warn-color1); }
.aifab-State-failed { color: var(--jp-error-color1); }
.aifab-Error { color: var(--jp-error-color1); white-space: pre-wrap; }
.aifab-Empty { color: var(--jp-ui-font-color2); }
.aifab-Url a { color: var(--jp-content-link-color); word-break: break-all; }
.aifab-Snippet, .aifab-Log {
  font-family: var(--jp-code-font-family);
  font-size: var(--jp-code-font-size);
  background: var(--jp-layout-color2);
  padding: 4px;
}
/* code keeps its lines (scroll sideways); log lines wrap where they must */
.aifab-Snippet { white-space: pre; overflow-x: auto; }
.aifab-Log { white-space: pre-wrap; overflow-wrap: anywhere; }
.aifab-Log { max-height: 240px; overflow-y: auto; }
.aifab-Button { margin: 4px 4px 0 0; padding: 0 8px; }
.aifab-Progress { width: 100%; }
.aifab-Sparkline polyline { fill: none; stroke: var(--jp-brand-color1); stroke-width: 1.5; }
.aifab-StatusBar { padding: 0 6px; display: flex; align-items: center; height: 100%; }
.aifab-StatusBar.aifab-mod-warn { background: var(--jp-warn-color1); color: white; }
.aifab-Form label { display: block; margin-bottom: 6px; }
.aifab-Form label span { display: block; }
.aifab-Form input { width: 100%; }
`,""]),r.d(t,{},{A:s})},"./node_modules/css-loader/dist/runtime/api.js"(e){e.exports=function(e){var t=[];return t.toString=function(){return this.map(function(t){var r="",o=void 0!==t[5];return t[4]&&(r+="@supports (".concat(t[4],") {")),t[2]&&(r+="@media ".concat(t[2]," {")),o&&(r+="@layer".concat(t[5].length>0?" ".concat(t[5]):""," {")),r+=e(t),o&&(r+="}"),t[2]&&(r+="}"),t[4]&&(r+="}"),r}).join("")},t.i=function(e,r,o,a,n){"string"==typeof e&&(e=[[null,e,void 0]]);var s={};if(o)for(var i=0;i<this.length;i++){var l=this[i][0];null!=l&&(s[l]=!0)}for(var d=0;d<e.length;d++){var c=[].concat(e[d]);o&&s[c[0]]||(void 0!==n&&(void 0===c[5]||(c[1]="@layer".concat(c[5].length>0?" ".concat(c[5]):""," {").concat(c[1],"}")),c[5]=n),r&&(c[2]&&(c[1]="@media ".concat(c[2]," {").concat(c[1],"}")),c[2]=r),a&&(c[4]?(c[1]="@supports (".concat(c[4],") {").concat(c[1],"}"),c[4]=a):c[4]="".concat(a)),t.push(c))}},t}},"./node_modules/css-loader/dist/runtime/noSourceMaps.js"(e){e.exports=function(e){return e[1]}},"./node_modules/style-loader/dist/runtime/injectStylesIntoStyleTag.js"(e){var t=[];function r(e){for(var r=-1,o=0;o<t.length;o++)if(t[o].identifier===e){r=o;break}return r}function o(e,o){for(var a={},n=[],s=0;s<e.length;s++){var i=e[s],l=o.base?i[0]+o.base:i[0],d=a[l]||0,c="".concat(l," ").concat(d);a[l]=d+1;var u=r(c),p={css:i[1],media:i[2],sourceMap:i[3],supports:i[4],layer:i[5]};if(-1!==u)t[u].references++,t[u].updater(p);else{var f=function(e,t){var r=t.domAPI(t);return r.update(e),function(t){t?(t.css!==e.css||t.media!==e.media||t.sourceMap!==e.sourceMap||t.supports!==e.supports||t.layer!==e.layer)&&r.update(e=t):r.remove()}}(p,o);o.byIndex=s,t.splice(s,0,{identifier:c,updater:f,references:1})}n.push(c)}return n}e.exports=function(e,a){var n=o(e=e||[],a=a||{});return function(e){e=e||[];for(var s=0;s<n.length;s++){var i=r(n[s]);t[i].references--}for(var l=o(e,a),d=0;d<n.length;d++){var c=r(n[d]);0===t[c].references&&(t[c].updater(),t.splice(c,1))}n=l}}},"./node_modules/style-loader/dist/runtime/insertBySelector.js"(e){var t={};e.exports=function(e,r){var o=function(e){if(void 0===t[e]){var r=document.querySelector(e);if(window.HTMLIFrameElement&&r instanceof window.HTMLIFrameElement)try{r=r.contentDocument.head}catch(e){r=null}t[e]=r}return t[e]}(e);if(!o)throw Error("Couldn't find a style target. This probably means that the value for the 'insert' parameter is invalid.");o.appendChild(r)}},"./node_modules/style-loader/dist/runtime/insertStyleElement.js"(e){e.exports=function(e){var t=document.createElement("style");return e.setAttributes(t,e.attributes),e.insert(t,e.options),t}},"./node_modules/style-loader/dist/runtime/setAttributesWithoutAttributes.js"(e,t,r){e.exports=function(e){var t=r.nc;t&&e.setAttribute("nonce",t)}},"./node_modules/style-loader/dist/runtime/styleDomAPI.js"(e){e.exports=function(e){if("u"<typeof document)return{update:function(){},remove:function(){}};var t=e.insertStyleElement(e);return{update:function(r){var o,a,n;o="",r.supports&&(o+="@supports (".concat(r.supports,") {")),r.media&&(o+="@media ".concat(r.media," {")),(a=void 0!==r.layer)&&(o+="@layer".concat(r.layer.length>0?" ".concat(r.layer):""," {")),o+=r.css,a&&(o+="}"),r.media&&(o+="}"),r.supports&&(o+="}"),(n=r.sourceMap)&&"u">typeof btoa&&(o+="\n/*# sourceMappingURL=data:application/json;base64,".concat(btoa(unescape(encodeURIComponent(JSON.stringify(n))))," */")),e.styleTagTransform(o,t,e.options)},remove:function(){var e;null===(e=t).parentNode||e.parentNode.removeChild(e)}}}},"./node_modules/style-loader/dist/runtime/styleTagTransform.js"(e){e.exports=function(e,t){if(t.styleSheet)t.styleSheet.cssText=e;else{for(;t.firstChild;)t.removeChild(t.firstChild);t.appendChild(document.createTextNode(e))}}},"./style/index.js"(e,t,r){var o=r("./node_modules/style-loader/dist/runtime/injectStylesIntoStyleTag.js"),a=r.n(o),n=r("./node_modules/style-loader/dist/runtime/styleDomAPI.js"),s=r.n(n),i=r("./node_modules/style-loader/dist/runtime/insertBySelector.js"),l=r.n(i),d=r("./node_modules/style-loader/dist/runtime/setAttributesWithoutAttributes.js"),c=r.n(d),u=r("./node_modules/style-loader/dist/runtime/insertStyleElement.js"),p=r.n(u),f=r("./node_modules/style-loader/dist/runtime/styleTagTransform.js"),m=r.n(f),y=r("./node_modules/css-loader/dist/cjs.js!./style/index.css"),b={};b.styleTagTransform=m(),b.setAttributes=c(),b.insert=l().bind(null,"head"),b.domAPI=s(),b.insertStyleElement=p(),a()(y.A,b),y.A&&y.A.locals&&y.A.locals}}]);