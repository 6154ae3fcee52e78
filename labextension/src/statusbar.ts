// The status bar item: where the session runs and the walltime left. The end time comes
// from the server once (and again every few minutes); the countdown itself ticks in the page.
import { Widget } from '@lumino/widgets';

import { ISession, getSession } from './api';
import { duration } from './dom';

/** Slurm warns the session 5 minutes before the end; we warn people 15 minutes before. */
export const WARN_BEFORE_S = 15 * 60;
const REFRESH_MS = 5 * 60 * 1000;

export function walltimeText(session: ISession, now: number): { text: string; warn: boolean } {
  if (session.walltime_end === null || session.walltime_end === undefined) {
    return { text: 'no walltime limit', warn: false };
  }
  const left = session.walltime_end - now;
  if (left <= 0) {
    return { text: 'walltime over: the session is ending', warn: true };
  }
  if (left <= WARN_BEFORE_S) {
    return {
      text: `${duration(left)} left: then runs checkpoint and services stop`,
      warn: true
    };
  }
  return { text: `${duration(left)} left`, warn: false };
}

export class SessionStatus extends Widget {
  private session: ISession | null = null;
  private error = '';
  private tick = 0;
  private refresh = 0;

  constructor() {
    super();
    this.addClass('aifab-StatusBar');
    this.node.title = 'AI factory session: where it runs and the walltime left';
  }

  protected onAfterAttach(): void {
    void this.load();
    this.tick = window.setInterval(() => this.render(), 1000);
    this.refresh = window.setInterval(() => void this.load(), REFRESH_MS);
  }

  protected onBeforeDetach(): void {
    window.clearInterval(this.tick);
    window.clearInterval(this.refresh);
  }

  private async load(): Promise<void> {
    try {
      this.session = await getSession();
      this.error = '';
    } catch (err) {
      this.error = String((err as Error).message || err);
    }
    this.render();
  }

  render(): void {
    const node = this.node;
    node.textContent = '';
    if (!this.session) {
      node.textContent = this.error ? `aifab: ${this.error}` : 'aifab: …';
      return;
    }
    const { text, warn } = walltimeText(this.session, Date.now() / 1000);
    node.classList.toggle('aifab-mod-warn', warn);
    node.textContent = `${this.session.placement} · ${text}`;
  }
}
