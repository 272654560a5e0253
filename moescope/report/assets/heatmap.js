/* moescope report widgets: canvas heatmaps drawn from embedded JSON, with selectors (layer, matrix, token...),
   hover tooltips (row × column: value) and click-to-zoom. No dependencies, no network.

   A widget is an element with data-heatmap="ID" plus a JSON script element with id="ID" holding:
   {controls: [{name, label, options: [[value, text], ...], value}], key: [control names joined by '|'],
    labels: [[label, ...], ...], data: {key: {r: row label set, c: column label set (default r), v: [[...]],
    more: {name: [[...]]}, note: text}}, colors: [hex stops], range: [lo, hi] | null (automatic),
    offdiag: automatic range without the diagonal (e.g. self-similarity 1), symmetric: range centred on 0,
    value_name, nan_note, digits, size} */
(function () {
  'use strict';
  var FONT = '11px system-ui, sans-serif';

  function rgb(hex) { return [1, 3, 5].map(function (i) { return parseInt(hex.slice(i, i + 2), 16); }); }

  function colormap(stops) {
    var c = stops.map(rgb);
    return function (t) {
      t = t > 1 ? 1 : (t >= 0 ? t : 0);
      var x = t * (c.length - 1), i = Math.min(Math.floor(x), c.length - 2), f = x - i, a = c[i], b = c[i + 1];
      return [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); });
    };
  }

  function finite(v) { return typeof v === 'number' && isFinite(v); }
  function fmt(v, digits) { return finite(v) ? v.toFixed(digits) : 'n/a'; }
  function make(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }

  function Heatmap(root, spec) {
    var self = this;
    this.root = root;
    this.spec = spec;
    this.cmap = colormap(spec.colors);
    this.state = {};
    this.zoom = null;
    root.textContent = '';
    var bar = make('div', 'hm-controls');
    (spec.controls || []).forEach(function (ctl) {
      var label = make('label', null, ctl.label + ' ');
      var select = make('select');
      select.setAttribute('data-control', ctl.name);
      ctl.options.forEach(function (o) {
        var opt = make('option', null, o[1]);
        opt.value = o[0];
        select.appendChild(opt);
      });
      select.value = ctl.value !== undefined ? ctl.value : ctl.options[0][0];
      self.state[ctl.name] = select.value;
      select.addEventListener('change', function () { self.state[ctl.name] = select.value; self.zoom = null; self.draw(); });
      label.appendChild(select);
      bar.appendChild(label);
    });
    this.reset = make('button', 'hm-reset', 'reset zoom');
    this.reset.type = 'button';
    this.reset.disabled = true;
    this.reset.addEventListener('click', function () { self.zoom = null; self.draw(); });
    bar.appendChild(this.reset);
    bar.appendChild(make('span', 'hm-hint', 'hover for values · click a cell to zoom in, again to zoom out'));
    root.appendChild(bar);
    this.wrap = make('div', 'hm-wrap');
    this.canvas = make('canvas', 'hm-canvas');
    this.tip = make('div', 'hm-tip');
    this.tip.style.display = 'none';
    this.wrap.appendChild(this.canvas);
    this.wrap.appendChild(this.tip);
    root.appendChild(this.wrap);
    var legend = make('div', 'hm-legend');
    this.lo = make('span', 'hm-lo');
    this.bar = make('canvas', 'hm-bar');
    this.hi = make('span', 'hm-hi');
    this.name = make('span', 'hm-name', spec.value_name || '');
    [this.lo, this.bar, this.hi, this.name].forEach(function (e) { legend.appendChild(e); });
    root.appendChild(legend);
    this.note = make('div', 'hm-note');
    root.appendChild(this.note);
    this.canvas.addEventListener('mousemove', function (ev) { self.hover(ev); });
    this.canvas.addEventListener('mouseleave', function () { self.tip.style.display = 'none'; });
    this.canvas.addEventListener('click', function (ev) { self.click(ev); });
    this.draw();
  }

  Heatmap.prototype.entry = function () {
    var self = this;
    return this.spec.data[this.spec.key.map(function (k) { return self.state[k]; }).join('|')];
  };

  Heatmap.prototype.range = function (e, z) {
    if (this.spec.range) { return this.spec.range; }
    var lo = Infinity, hi = -Infinity, skipDiagonal = this.spec.offdiag && (e.c === undefined || e.c === e.r);
    e.v.forEach(function (row, i) {
      row.forEach(function (x, j) {
        if (finite(x) && !(skipDiagonal && i === j)) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
      });
    });
    if (lo > hi) { return [0, 1]; }
    if (this.spec.symmetric) { var m = Math.max(Math.abs(lo), Math.abs(hi)) || 1; return [-m, m]; }
    return hi > lo ? [lo, hi] : [lo - 0.5, hi + 0.5];
  };

  Heatmap.prototype.draw = function () {
    var spec = this.spec, e = this.entry(), ctx = this.canvas.getContext('2d');
    this.geo = null;
    if (!e) {
      this.canvas.width = 320; this.canvas.height = 30;
      ctx.font = FONT; ctx.fillStyle = '#555'; ctx.fillText('no data for this selection', 4, 18);
      this.note.textContent = '';
      return;
    }
    var rows = spec.labels[e.r], cols = spec.labels[e.c === undefined ? e.r : e.c];
    var z = this.zoom || { r0: 0, c0: 0, nr: rows.length, nc: cols.length };
    this.reset.disabled = !this.zoom;
    var cs = Math.max(3, Math.min(44, Math.floor((spec.size || 520) / Math.max(z.nr, z.nc))));
    ctx.font = FONT;
    var step = Math.max(1, Math.ceil(12 / cs)), left = 0, top = 0, i, j;
    for (i = 0; i < z.nr; i += step) { left = Math.max(left, ctx.measureText(rows[z.r0 + i]).width); }
    for (j = 0; j < z.nc; j += step) { top = Math.max(top, ctx.measureText(cols[z.c0 + j]).width); }
    left = Math.ceil(left) + 8; top = Math.ceil(top) + 8;
    var w = left + cs * z.nc + 4, h = top + cs * z.nr + 4, dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(w * dpr); this.canvas.height = Math.round(h * dpr);
    this.canvas.style.width = w + 'px'; this.canvas.style.height = h + 'px';
    ctx = this.canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.font = FONT;
    var r = this.range(e, z), lo = r[0], hi = r[1], span = (hi - lo) || 1;
    var annotate = cs >= 30;
    ctx.textAlign = 'center'; ctx.textBaseline = 'middle';
    for (i = 0; i < z.nr; i++) {
      for (j = 0; j < z.nc; j++) {
        var v = e.v[z.r0 + i][z.c0 + j], x = left + j * cs, y = top + i * cs;
        var c = finite(v) ? this.cmap((v - lo) / span) : null;
        ctx.fillStyle = c ? 'rgb(' + c.join(',') + ')' : (spec.nan_color || '#d0d0d0');
        ctx.fillRect(x, y, cs, cs);
        if (annotate && c) {
          ctx.fillStyle = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) > 140 ? '#000' : '#fff';
          ctx.fillText(fmt(v, 2), x + cs / 2, y + cs / 2);
        }
      }
    }
    ctx.fillStyle = '#222';
    ctx.textAlign = 'right';
    for (i = 0; i < z.nr; i += step) { ctx.fillText(rows[z.r0 + i], left - 4, top + (i + 0.5) * cs); }
    for (j = 0; j < z.nc; j += step) {
      ctx.save();
      ctx.translate(left + (j + 0.5) * cs, top - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = 'left';
      ctx.fillText(cols[z.c0 + j], 0, 0);
      ctx.restore();
    }
    this.geo = { left: left, top: top, cs: cs, z: z, rows: rows, cols: cols, e: e };
    this.legend(lo, hi);
    this.note.textContent = (e.note || '') + (this.zoom ? ' (zoomed: rows ' + rows[z.r0] + '…' + rows[z.r0 + z.nr - 1] +
      ', columns ' + cols[z.c0] + '…' + cols[z.c0 + z.nc - 1] + ')' : '');
  };

  Heatmap.prototype.legend = function (lo, hi) {
    var digits = this.spec.digits === undefined ? 3 : this.spec.digits, n = 160, ctx;
    this.bar.width = n; this.bar.height = 10;
    ctx = this.bar.getContext('2d');
    for (var k = 0; k < n; k++) { ctx.fillStyle = 'rgb(' + this.cmap(k / (n - 1)).join(',') + ')'; ctx.fillRect(k, 0, 1, 10); }
    this.lo.textContent = fmt(lo, digits);
    this.hi.textContent = fmt(hi, digits);
  };

  Heatmap.prototype.cell = function (ev) {
    var g = this.geo;
    if (!g) { return null; }
    var box = this.canvas.getBoundingClientRect();
    var x = ev.clientX - box.left, y = ev.clientY - box.top;
    var i = Math.floor((y - g.top) / g.cs), j = Math.floor((x - g.left) / g.cs);
    if (x < g.left || y < g.top || i < 0 || j < 0 || i >= g.z.nr || j >= g.z.nc) { return null; }
    return { i: g.z.r0 + i, j: g.z.c0 + j, x: x, y: y };
  };

  Heatmap.prototype.hover = function (ev) {
    var p = this.cell(ev), g = this.geo, spec = this.spec, digits = spec.digits === undefined ? 3 : spec.digits;
    if (!p) { this.tip.style.display = 'none'; return; }
    var v = g.e.v[p.i][p.j], text = g.rows[p.i] + ' × ' + g.cols[p.j] + ': ' +
      (finite(v) ? fmt(v, digits) : (spec.nan_note || 'no value'));
    var more = g.e.more || {};
    Object.keys(more).forEach(function (name) { text += '\n' + name + ': ' + fmt(more[name][p.i][p.j], digits); });
    this.tip.textContent = text;
    this.tip.style.display = 'block';
    this.tip.style.left = (p.x + 14) + 'px';
    this.tip.style.top = (p.y + 14) + 'px';
  };

  Heatmap.prototype.click = function (ev) {
    var p = this.cell(ev), g = this.geo;
    if (this.zoom) { this.zoom = null; this.draw(); return; }
    if (!p || Math.max(g.rows.length, g.cols.length) <= (this.spec.zoom_min || 12)) { return; }
    function window_(n, at) { var w = Math.min(n, Math.max(8, Math.ceil(n / 4))); return [Math.max(0, Math.min(n - w, at - Math.floor(w / 2))), w]; }
    var r = window_(g.rows.length, p.i), c = window_(g.cols.length, p.j);
    this.zoom = { r0: r[0], nr: r[1], c0: c[0], nc: c[1] };
    this.tip.style.display = 'none';
    this.draw();
  };

  var made = 0;
  Array.prototype.forEach.call(document.querySelectorAll('[data-heatmap]'), function (node) {
    try {
      var source = document.getElementById(node.getAttribute('data-heatmap'));
      new Heatmap(node, JSON.parse(source.textContent));
      made += 1;
    } catch (err) {
      node.textContent = 'this interactive figure could not be drawn: ' + err;
      if (window.moescopeRecordError) { window.moescopeRecordError('heatmap ' + node.getAttribute('data-heatmap') + ': ' + err); }
    }
  });
  document.documentElement.setAttribute('data-heatmaps', String(made));
})();
