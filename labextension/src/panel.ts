// The "AI factory" side panel: the session's GPUs, services, fine-tune runs, dask clusters and
// Slurm allocations, live.
// It polls the REST API while it is visible and not at all while hidden: a hundred idle
// sessions must not poll their servers. When the server does not answer, Lumino's Poll backs
// off exponentially with random jitter (up to a minute), so sessions do not retry in step.
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Poll } from '@lumino/polling';
import { Widget } from '@lumino/widgets';

import {
  IAllocation,
  IAllocations,
  IDaskCluster,
  IProgress,
  IService,
  ISession,
  browserUrl,
  createService,
  getLogs,
  getProgress,
  getSession,
  listAllocations,
  listDask,
  listServices,
  openaiSnippet,
  releaseAllocation,
  resumeRun,
  serverUrl,
  stopService
} from './api';
import { button, duration, h, sparkline } from './dom';
import { walltimeText } from './statusbar';

/** The clipboard where the page may use it (https, localhost), else the text selected. */
function copy(text: string, node: HTMLElement): void {
  if (navigator.clipboard && window.isSecureContext) {
    void navigator.clipboard.writeText(text);
    return;
  }
  const range = document.createRange();
  range.selectNodeContents(node);
  window.getSelection()?.removeAllRanges();
  window.getSelection()?.addRange(range);
}

const LIVE = new Set(['starting', 'ready', 'stopping']);
const LOG_LINES = 200;

export class FactoryPanel extends Widget {
  private session: ISession | null = null;
  private services: IService[] = [];
  private dask: IDaskCluster[] = [];
  private allocations: IAllocations = { allocations: [], allowed: [] };
  private progress = new Map<string, IProgress>();
  private finalProgress = new Set<string>(); // ended runs whose last progress is in hand
  private logs = new Map<string, HTMLElement>(); // open log viewers, by service
  private error = ''; // the last poll's, cleared by the next that succeeds
  private actionError = ''; // the last Stop's or Serve's, kept until the next action
  private poll: Poll;
  private logPoll: Poll;

  constructor() {
    super();
    this.id = 'aifab-panel';
    this.addClass('aifab-Panel');
    this.title.caption = 'AI factory';
    this.poll = new Poll({
      factory: () => this.refresh(),
      frequency: { interval: 3000, backoff: true, max: 60_000 },
      standby: () => this.isHidden || !this.isAttached || document.hidden,
      name: 'aifab:panel'
    });
    this.logPoll = new Poll({
      factory: () => this.refreshLogs(),
      frequency: { interval: 2000, backoff: true, max: 60_000 },
      standby: () => this.isHidden || !this.isAttached || this.logs.size === 0,
      name: 'aifab:logs'
    });
  }

  dispose(): void {
    this.poll.dispose();
    this.logPoll.dispose();
    super.dispose();
  }

  protected onAfterShow(): void {
    void this.poll.refresh(); // fresh at once when opened, not at the next tick
  }

  private async refresh(): Promise<void> {
    try {
      const [session, services, dask, allocations] = await Promise.all([
        getSession(),
        listServices(),
        listDask(),
        listAllocations()
      ]);
      this.session = session;
      this.services = services;
      this.dask = dask;
      this.allocations = allocations;
      this.error = '';
      // a live run's progress each time; an ended run's once more (its last word), then kept
      const ended = new Set(services.filter(s => !LIVE.has(s.status)).map(s => s.name));
      await Promise.all(
        services
          .filter(s => s.kind === 'finetune' && s.output)
          .filter(s => !(ended.has(s.name) && this.finalProgress.has(s.name)))
          .map(async s => {
            this.progress.set(s.name, await getProgress(s.name));
            if (ended.has(s.name)) {
              this.finalProgress.add(s.name);
            }
          })
      );
    } catch (err) {
      this.error = String((err as Error).message || err);
      this.render();
      throw err; // the poll backs off
    }
    this.render();
  }

  private async refreshLogs(): Promise<void> {
    await Promise.all(
      [...this.logs.entries()].map(async ([name, pre]) => {
        const { lines } = await getLogs(name, LOG_LINES);
        // follow the end, unless the reader scrolled up to read
        const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.textContent = lines.join('\n');
        if (atEnd) {
          pre.scrollTop = pre.scrollHeight;
        }
      })
    );
  }

  private render(): void {
    const node = this.node;
    node.textContent = '';
    node.appendChild(h('h2', { class: 'aifab-Title' }, 'AI factory'));
    for (const message of [this.error, this.actionError]) {
      if (message) {
        node.appendChild(h('div', { class: 'aifab-Error' }, message));
      }
    }
    const s = this.session;
    if (!s) {
      node.appendChild(h('div', {}, 'loading…'));
      return;
    }
    node.appendChild(
      h(
        'div',
        { class: 'aifab-Session' },
        h('div', {}, `Session: ${s.placement}${s.profile ? ` · profile ${s.profile}` : ''}`),
        h('div', { class: 'aifab-Walltime' }, walltimeText(s, Date.now() / 1000).text)
      )
    );
    node.appendChild(this.renderGpus(s));
    const services = this.services.filter(x => x.kind !== 'finetune');
    const runs = this.services.filter(x => x.kind === 'finetune');
    node.appendChild(h('h3', {}, `Services (${services.length})`));
    if (!services.length) {
      node.appendChild(
        h('div', { class: 'aifab-Empty' }, 'none: %serve MODEL, or the command "aifab: serve a model…"')
      );
    }
    for (const svc of services) {
      node.appendChild(this.renderService(svc));
    }
    node.appendChild(h('h3', {}, `Fine-tune runs (${runs.length})`));
    if (!runs.length) {
      node.appendChild(h('div', { class: 'aifab-Empty' }, 'none: %finetune MODEL DATA'));
    }
    for (const run of runs) {
      node.appendChild(this.renderRun(run));
    }
    node.appendChild(h('h3', {}, `Dask clusters (${this.dask.length})`));
    if (!this.dask.length) {
      node.appendChild(h('div', { class: 'aifab-Empty' }, 'none: aifab.cluster(workers=N)'));
    }
    for (const cluster of this.dask) {
      node.appendChild(this.renderCluster(cluster));
    }
    const { allocations, allowed } = this.allocations;
    if (allocations.length || allowed.length) {
      // (a session that may allocate nothing has no section: nothing to say there)
      node.appendChild(h('h3', {}, `Allocations (${allocations.length})`));
      if (!allocations.length) {
        node.appendChild(
          h('div', { class: 'aifab-Empty' }, `none: aifab.allocate(...); allowed: ${allowed.join('; ')}`)
        );
      }
      for (const alloc of allocations) {
        node.appendChild(this.renderAllocation(alloc));
      }
    }
  }

  private renderCluster(c: IDaskCluster): HTMLElement {
    const card = h('div', { class: 'aifab-Card', 'data-cluster': c.id });
    const where = c.backend === 'slurm' ? 'Slurm worker jobs' : `${c.backend} workers`;
    card.appendChild(
      h(
        'div',
        { class: 'aifab-CardHead' },
        h('span', { class: 'aifab-Name' }, c.name || c.id),
        h('span', {}, where)
      )
    );
    const running = c.running === null ? 'unknown' : String(c.running);
    const counts = `workers: ${c.requested} requested · ${c.pending} pending · ${running} running`;
    card.appendChild(h('div', { class: 'aifab-Workers' }, counts));
    if (c.pending_reasons.length) {
      card.appendChild(h('div', {}, `pending because: ${c.pending_reasons.join(', ')} (Slurm)`));
    }
    if (c.slurm_note) {
      card.appendChild(h('div', { class: 'aifab-Error' }, c.slurm_note));
    }
    if (c.dashboard_path) {
      const url = serverUrl(c.dashboard_path);
      card.appendChild(
        h('div', { class: 'aifab-Url' }, 'dashboard: ', h('a', { href: url, target: '_blank', rel: 'noopener' }, url))
      );
    } else {
      card.appendChild(h('div', { class: 'aifab-Empty' }, `dashboard: on ${c.kernel_host}, not reachable from here`));
    }
    return card;
  }

  private renderAllocation(a: IAllocation): HTMLElement {
    const card = h('div', { class: 'aifab-Card', 'data-allocation': a.name });
    card.appendChild(
      h(
        'div',
        { class: 'aifab-CardHead' },
        h('span', { class: 'aifab-Name' }, a.name),
        h('span', { class: `aifab-State aifab-State-${a.state}` }, a.state)
      )
    );
    const r = a.request || {};
    const gpus = r.gpus ? ` · ${r.gpus} GPU${r.gpus > 1 ? 's' : ''}/node` : '';
    card.appendChild(
      h('div', {}, `Slurm job ${a.job_id} · profile ${r.profile || '?'} · ${r.nodes || 1} node(s)${gpus}`)
    );
    if (a.state === 'queued') {
      const position = a.position === null ? '' : ` · position ${a.position} in the queue`;
      const estimate = a.estimated_start ? ` · Slurm expects it to start at ${a.estimated_start}` : '';
      card.appendChild(h('div', {}, `queued: ${a.reason || 'waiting'}${position}${estimate}`));
    }
    if (a.nodes.length) {
      card.appendChild(h('div', {}, `nodes: ${a.nodes.join(', ')}`));
    }
    if (a.state === 'running') {
      card.appendChild(h('div', {}, `kernels and steps running in it: ${a.steps}`));
    }
    if (a.message) {
      card.appendChild(h('div', { class: 'aifab-Empty' }, a.message));
    }
    if (a.state === 'queued' || a.state === 'running') {
      card.appendChild(button('Release', () => void this.confirmRelease(a.name), 'scancel the job'));
    }
    return card;
  }

  async confirmRelease(name: string): Promise<void> {
    const body = `Release ${name}? Slurm ends its job, and every kernel and step running in it.`;
    if (await confirmed('Release allocation', body, 'Release')) {
      await this.act('release', name, () => releaseAllocation(name));
    }
  }

  private renderGpus(s: ISession): HTMLElement {
    const box = h('div', { class: 'aifab-Gpus' }, h('h3', {}, 'GPUs'));
    if (!s.visible_gpus.length) {
      box.appendChild(h('div', { class: 'aifab-Empty' }, 'no GPU: this session runs on CPUs'));
      return box;
    }
    const holder = new Map<string, string>();
    for (const [name, gpus] of Object.entries(s.gpus_held || {})) {
      for (const gpu of gpus) {
        holder.set(gpu, name);
      }
    }
    const usage = new Map((s.gpu_usage || []).map(u => [u.id, u]));
    const gib = (mib: number) => (mib / 1024).toFixed(1);
    for (const gpu of s.visible_gpus) {
      const who = holder.get(gpu);
      const u = usage.get(gpu);
      const stats = u
        ? ` · ${u.name} · ${gib(u.memory_used_mib)}/${gib(u.memory_total_mib)} GiB · ${u.utilization}%`
        : '';
      box.appendChild(h('div', { class: 'aifab-Gpu' }, `GPU ${gpu}: ${who ? `held by ${who}` : 'free'}${stats}`));
    }
    if (s.gpu_usage_note) {
      box.appendChild(h('div', { class: 'aifab-Empty' }, s.gpu_usage_note));
    }
    return box;
  }

  private renderService(svc: IService): HTMLElement {
    const card = h('div', { class: 'aifab-Card', 'data-service': svc.name });
    const state = svc.status === 'starting' && svc.phase ? `starting: ${svc.phase}` : svc.status;
    card.appendChild(
      h(
        'div',
        { class: 'aifab-CardHead' },
        h('span', { class: 'aifab-Name' }, svc.name),
        h('span', { class: `aifab-State aifab-State-${svc.status}` }, state)
      )
    );
    card.appendChild(h('div', {}, `model: ${svc.served_name || svc.model}`));
    card.appendChild(h('div', {}, `GPUs: ${svc.gpus.length ? svc.gpus.join(', ') : 'none (CPU)'}`));
    if (svc.error) {
      card.appendChild(h('div', { class: 'aifab-Error' }, svc.error));
    }
    if (svc.status === 'ready' && svc.kind === 'vllm') {
      const url = browserUrl(this.session, svc.name);
      const link = h('a', { href: `${url}models`, target: '_blank', rel: 'noopener' }, url);
      card.appendChild(h('div', { class: 'aifab-Url' }, 'browser URL: ', link));
      const snippet = openaiSnippet(url, svc.served_name || svc.name);
      const pre = h('pre', { class: 'aifab-Snippet' }, snippet);
      card.appendChild(pre);
      card.appendChild(button('Copy snippet', () => copy(snippet, pre), 'Copy the OpenAI client code'));
    }
    card.appendChild(this.logToggle(svc));
    if (LIVE.has(svc.status)) {
      card.appendChild(button('Stop', () => void this.confirmStop(svc.name)));
    }
    const log = this.logs.get(svc.name);
    if (log) {
      card.appendChild(log);
    }
    return card;
  }

  private renderRun(run: IService): HTMLElement {
    const card = h('div', { class: 'aifab-Card', 'data-run': run.name });
    const p = this.progress.get(run.name);
    const stepping = run.status === 'starting' && p && p.step > 0;
    const state = stepping ? 'running' : run.status;
    card.appendChild(
      h(
        'div',
        { class: 'aifab-CardHead' },
        h('span', { class: 'aifab-Name' }, run.name),
        h('span', { class: `aifab-State aifab-State-${run.status}` }, state)
      )
    );
    card.appendChild(h('div', {}, `model: ${run.model}`));
    if (p && p.total) {
      const bar = h('progress', { class: 'aifab-Progress', max: String(p.total), value: String(p.step) });
      const loss = p.loss === null ? '' : ` · loss ${p.loss.toFixed(4)}`;
      const eta = run.status === 'starting' && p.eta_s !== null ? ` · ETA ${duration(p.eta_s)}` : '';
      card.appendChild(h('div', { class: 'aifab-Steps' }, `step ${p.step}/${p.total}${loss}${eta}`));
      card.appendChild(h('div', {}, bar, sparkline(p.losses)));
    }
    if (p && p.checkpoint) {
      card.appendChild(h('div', {}, `last checkpoint: ${p.checkpoint}`));
    }
    if (p && p.output) {
      card.appendChild(h('div', {}, `done: ${p.output}`));
    }
    if (run.error) {
      card.appendChild(h('div', { class: 'aifab-Error' }, run.error));
    }
    card.appendChild(this.logToggle(run));
    if (LIVE.has(run.status)) {
      card.appendChild(button('Stop', () => void this.confirmStop(run.name), 'checkpoint and stop'));
    }
    if ((run.status === 'failed' || run.status === 'stopped') && p && p.checkpoint) {
      card.appendChild(
        button('Resume', () => void this.resume(run.name), 'continue from the last checkpoint')
      );
    }
    if (run.status === 'finished' && p && p.output) {
      card.appendChild(button('Serve this adapter', () => void this.serveRun(run, p)));
    }
    const log = this.logs.get(run.name);
    if (log) {
      card.appendChild(log);
    }
    return card;
  }

  private logToggle(svc: IService): HTMLElement {
    const open = this.logs.has(svc.name);
    return button(open ? 'Hide logs' : 'Logs', () => {
      if (this.logs.has(svc.name)) {
        this.logs.delete(svc.name);
      } else {
        this.logs.set(svc.name, h('pre', { class: 'aifab-Log', 'aria-readonly': 'true' }, 'loading…'));
        void this.logPoll.refresh();
      }
      this.render();
    });
  }

  /** What %finetune --serve does once a run is done: an adapter on its base model, or the
   * output itself for a full fine-tune; the service is named RUN-srv. */
  private async serveRun(run: IService, p: IProgress): Promise<void> {
    const name = `${run.name.slice(0, 36).replace(/-+$/, '')}-srv`;
    const spec = p.adapter
      ? { kind: 'vllm', name, model: run.model, loras: { [run.name]: run.output } }
      : { kind: 'vllm', name, model: run.output };
    await this.act('serve', run.name, async () => {
      const session = await getSession();
      await createService({ ...spec, gpus: session.visible_gpus.length ? 1 : 0 });
    });
  }

  /** The run again, from its last checkpoint, with the options it was started with: the
   * server keeps them, so the panel needs nothing but the name. */
  private async resume(name: string): Promise<void> {
    this.finalProgress.delete(name); // it is live again: its progress moves
    await this.act('resume', name, () => resumeRun(name));
  }

  async confirmStop(name: string): Promise<void> {
    if (await confirmed('Stop service', `Stop ${name}? Its process ends and its GPUs are freed.`, 'Stop')) {
      await this.act('stop', name, () => stopService(name));
    }
  }

  /** One action through the REST API: its refusal, word for word, stays in the panel until
   * the next action; the panel is refreshed either way. */
  private async act(what: string, name: string, call: () => Promise<unknown>): Promise<void> {
    try {
      await call();
      this.actionError = '';
    } catch (err) {
      this.actionError = `${what} ${name}: ${(err as Error).message}`;
    }
    await this.poll.refresh();
  }
}

/** A confirmation dialog; the body is a string, so a name in it shows as text. */
async function confirmed(title: string, body: string, label: string): Promise<boolean> {
  const result = await showDialog({
    title,
    body,
    buttons: [Dialog.cancelButton(), Dialog.warnButton({ label })]
  });
  return result.button.accept;
}
