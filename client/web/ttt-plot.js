// The "TTT learning" plot: the server's `ttt_telemetry` points on a <canvas>, no library. Top:
// the TTT inner loss before and after each frame's own update (left axis); below, a strip with
// the fast weights' drift from W0 on its own axis, so that a small drift is not flattened by the
// loss's scale. Both share the x axis, session time in seconds. Redrawn at most once per
// animation frame however many points arrive in between, and whenever the canvas is resized.

const SERIES = [
  { key: 'inner_loss_before', color: '--plot-before', area: 'loss' },
  { key: 'inner_loss_after', color: '--plot-after', area: 'loss' },
  { key: 'drift', color: '--plot-drift', area: 'drift' },
];
const MARGIN = { left: 48, right: 12, top: 12, bottom: 34 }; // CSS px: tick labels and x title
const GAP = 24; // between the loss area and the drift strip
const DRIFT_SHARE = 0.3; // of the plotting height
const DOTS_UP_TO = 60; // points: beyond that the dots would hide the lines
const FONT = '11px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif';

export class TelemetryPlot {
  /** `frameRate`: model frames per second, to turn a point's frame into session time. */
  constructor(canvas, frameRate) {
    this.canvas = canvas;
    this.frameRate = frameRate;
    this.points = [];
    this.pending = false;
    this.geometry = null; // where the last draw put each area, in CSS px (the tests read it)
    this.draws = 0;
    new ResizeObserver(() => this.schedule()).observe(canvas);
    matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => this.schedule());
  }

  /** Draw these points from now on; the array is kept, so push to it and call schedule(). */
  show(points) {
    this.points = points;
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const ctx = this.prepare();
    this.draws += 1;
    const { width, height } = this.canvas.getBoundingClientRect();
    if (!this.points.length || width < MARGIN.left + MARGIN.right + 20) {
      this.geometry = null; // nothing plotted: the panel's own text says why
      return;
    }
    const geometry = this.layout(width, height);
    const times = this.points.map((p) => p.frame / this.frameRate);
    const x = toPixels(niceScale(0, maxOf(times), Math.max(2, geometry.loss.w / 60)),
      geometry.loss.x, geometry.loss.w, false);
    const y = {
      loss: toPixels(lossScale(this.points), geometry.loss.y, geometry.loss.h, true),
      drift: toPixels(driftScale(this.points), geometry.drift.y, geometry.drift.h, true),
    };
    const color = (name) => getComputedStyle(this.canvas).getPropertyValue(name).trim();
    const style = { grid: color('--line'), text: color('--muted'), font: FONT };
    drawGrid(ctx, geometry.loss, x, y.loss, style, false);
    drawGrid(ctx, geometry.drift, x, y.drift, style, true);
    drawTitles(ctx, geometry, style);
    for (const s of SERIES) {
      const values = this.points.map((p) => p[s.key]);
      drawLine(ctx, times, values, x, y[s.area], geometry[s.area], color(s.color));
    }
    this.geometry = { ...geometry, dpr: this.dpr };
  }

  /** Size the bitmap to the element's CSS size at the device's pixel ratio, cleared, with CSS px
   * as the drawing unit: sharp lines on high-DPI screens. */
  prepare() {
    const { width, height } = this.canvas.getBoundingClientRect();
    this.dpr = window.devicePixelRatio || 1;
    const w = Math.round(width * this.dpr);
    const h = Math.round(height * this.dpr);
    if (this.canvas.width !== w || this.canvas.height !== h) {
      this.canvas.width = w;
      this.canvas.height = h;
    }
    const ctx = this.canvas.getContext('2d');
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    return ctx;
  }

  layout(width, height) {
    const x = MARGIN.left;
    const w = width - MARGIN.left - MARGIN.right;
    const plotH = height - MARGIN.top - MARGIN.bottom - GAP;
    const driftH = Math.round(plotH * DRIFT_SHARE);
    const lossH = plotH - driftH;
    return {
      loss: { x, y: MARGIN.top, w, h: lossH },
      drift: { x, y: MARGIN.top + lossH + GAP, w, h: driftH },
    };
  }
}

// -- scales --------------------------------------------------------------------------------------

const finite = (values) => values.filter(Number.isFinite); // null (not sent) is a gap

/** Math.max(...values) takes its values as arguments, and a long session has more points than
 * a call may have arguments. */
const maxOf = (values) => values.reduce((m, v) => (v > m ? v : m), -Infinity);

/** The loss axis spans the data, not 0..max: the gap between before and after is what shows
 * learning, and it is small next to the loss itself. */
function lossScale(points) {
  const v = finite(points.flatMap((p) => [p.inner_loss_before, p.inner_loss_after]));
  if (!v.length) return niceScale(0, 1, 4);
  let lo = -maxOf(v.map((x) => -x));
  let hi = maxOf(v);
  if (hi - lo < 1e-9) { // one value so far: a band around it
    const pad = Math.max(Math.abs(lo) * 0.05, 1e-3);
    lo -= pad;
    hi += pad;
  }
  return niceScale(lo, hi, 4);
}

/** Drift is a relative norm that starts at 0: its axis starts there too. */
function driftScale(points) {
  const v = finite(points.map((p) => p.drift));
  const hi = v.length ? maxOf(v) : 0;
  return niceScale(0, hi > 0 ? hi : 1e-2, 2);
}

/** Round bounds and a 1-2-5 step giving about `count` intervals. */
function niceScale(lo, hi, count) {
  const raw = (hi - lo) / count || 1;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  const step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
  const first = Math.floor(lo / step + 1e-9);
  const last = Math.max(Math.ceil(hi / step - 1e-9), first + 1);
  const ticks = [];
  for (let i = first; i <= last; i++) ticks.push(i * step); // by index: no summed rounding
  return { lo: first * step, hi: last * step, step, ticks };
}

/** A scale with its mapping to pixels along one side of an area (y grows downwards). */
function toPixels(scale, start, length, flip) {
  const frac = (v) => (v - scale.lo) / (scale.hi - scale.lo);
  return { ...scale, px: (v) => start + (flip ? 1 - frac(v) : frac(v)) * length };
}

function tickLabel(v, step) {
  if (Math.abs(v) < step / 2) return '0';
  if (step < 1e-4) return v.toExponential(1);
  return v.toFixed(Math.max(0, -Math.floor(Math.log10(step) + 1e-9)));
}

// -- drawing -------------------------------------------------------------------------------------

/** Gridlines and y tick labels of one area; x tick labels only under the bottom one. */
function drawGrid(ctx, area, x, y, style, withX) {
  ctx.strokeStyle = style.grid;
  ctx.lineWidth = 1;
  ctx.fillStyle = style.text;
  ctx.font = style.font;
  ctx.beginPath();
  for (const v of y.ticks) {
    const py = Math.round(y.px(v)) + 0.5; // on a pixel's centre: a crisp 1 px line
    ctx.moveTo(area.x, py);
    ctx.lineTo(area.x + area.w, py);
  }
  for (const v of x.ticks) {
    const px = Math.round(x.px(v)) + 0.5;
    ctx.moveTo(px, area.y);
    ctx.lineTo(px, area.y + area.h);
  }
  ctx.stroke();
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  for (const v of y.ticks) ctx.fillText(tickLabel(v, y.step), area.x - 6, y.px(v));
  if (!withX) return;
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  for (const v of x.ticks) ctx.fillText(tickLabel(v, x.step), x.px(v), area.y + area.h + 5);
}

function drawTitles(ctx, geometry, style) {
  ctx.fillStyle = style.text;
  ctx.font = style.font;
  ctx.textBaseline = 'bottom';
  ctx.textAlign = 'right';
  const { drift } = geometry;
  ctx.fillText('session time (s)', drift.x + drift.w, drift.y + drift.h + MARGIN.bottom);
  // the y titles sit inside their areas' top left corners, over the gridlines
  ctx.textAlign = 'left';
  ctx.textBaseline = 'top';
  ctx.fillText('inner loss', geometry.loss.x + 4, geometry.loss.y + 2);
  ctx.fillText('drift', drift.x + 4, drift.y + 2);
}

/** One series: a line through its finite values (a missing one breaks it), dots while few. */
function drawLine(ctx, times, values, x, y, area, color) {
  ctx.save();
  ctx.beginPath();
  ctx.rect(area.x, area.y - 3, area.w, area.h + 6); // dots at the bounds stay whole
  ctx.clip();
  ctx.strokeStyle = ctx.fillStyle = color;
  ctx.lineWidth = 2;
  ctx.lineJoin = 'round';
  ctx.beginPath();
  let drawing = false;
  values.forEach((v, i) => {
    if (!Number.isFinite(v)) {
      drawing = false;
      return;
    }
    if (drawing) ctx.lineTo(x.px(times[i]), y.px(v));
    else ctx.moveTo(x.px(times[i]), y.px(v));
    drawing = true;
  });
  ctx.stroke();
  if (values.length <= DOTS_UP_TO) {
    values.forEach((v, i) => {
      if (!Number.isFinite(v)) return;
      ctx.beginPath();
      ctx.arc(x.px(times[i]), y.px(v), 2.5, 0, 2 * Math.PI);
      ctx.fill();
    });
  }
  ctx.restore();
}
