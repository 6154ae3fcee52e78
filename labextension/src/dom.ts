// Every name, model and log line the panel shows comes from the session: it is put in the
// page as text nodes only (never innerHTML), so "<script>" in any of them is just text.
type Child = Node | string | null | undefined | false;

export function h(
  tag: string,
  attrs: { [key: string]: string } = {},
  ...children: Child[]
): HTMLElement {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    node.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return node;
}

export function button(label: string, onClick: () => void, title = ''): HTMLButtonElement {
  const b = h('button', { class: 'jp-Button aifab-Button', type: 'button' }, label);
  if (title) {
    b.title = title;
  }
  b.addEventListener('click', onClick);
  return b as HTMLButtonElement;
}

/** 1h 05m, 4m 10s, 12s: a duration as people read it. */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const hours = Math.floor(s / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  if (hours) {
    return `${hours}h ${String(minutes).padStart(2, '0')}m`;
  }
  if (minutes) {
    return `${minutes}m ${String(s % 60).padStart(2, '0')}s`;
  }
  return `${s}s`;
}

/** A loss curve as an SVG polyline: built with DOM calls, no markup strings. */
export function sparkline(values: number[], width = 160, height = 28): SVGElement {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('width', String(width));
  svg.setAttribute('height', String(height));
  svg.setAttribute('class', 'aifab-Sparkline');
  if (values.length > 1) {
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const span = hi - lo || 1;
    const points = values.map((v, i) => {
      const x = (i / (values.length - 1)) * (width - 2) + 1;
      const y = height - 1 - ((v - lo) / span) * (height - 2);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    const line = document.createElementNS(ns, 'polyline');
    line.setAttribute('points', points.join(' '));
    svg.appendChild(line);
  }
  return svg;
}
