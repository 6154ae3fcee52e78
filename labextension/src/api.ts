// The session's REST API (/aifab/api/...), the same one the magics use: every request goes
// through Jupyter's ServerConnection, so it carries the session's auth (the hub's cookie and
// XSRF token) and follows the server's base URL (the hub's /user/NAME/, c.ServerApp.base_url).
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface IGpuUsage {
  id: string;
  name: string;
  memory_used_mib: number;
  memory_total_mib: number;
  utilization: number;
}

export interface ISession {
  backend: string;
  profile: string;
  placement: string;
  gpu_count: number;
  visible_gpus: string[];
  gpus_held: { [service: string]: string[] };
  walltime_end: number | null;
  walltime_left: number | null;
  slurm_job_id: string | null;
  pod_name: string | null;
  public_url: string;
  gpu_usage?: IGpuUsage[]; // where NVML is available: the visible GPUs only
  gpu_usage_note?: string;
}

export interface IService {
  name: string;
  kind: string;
  status: string;
  phase: string;
  model: string;
  served_name: string;
  gpus: string[];
  output: string;
  error: string;
  exit_code: number | null;
  uptime: number;
  ready_at: number | null;
  started_at: number;
}

export interface IProgress {
  step: number;
  total: number;
  loss: number | null;
  losses: number[];
  eta_s: number | null;
  tokens_per_s: number | null;
  checkpoint: string;
  output: string;
  interrupted: string;
  adapter: boolean;
}

export interface IDaskCluster {
  id: string;
  name: string;
  backend: string;
  requested: number;
  pending: number;
  pending_reasons: string[];
  running: number | null; // null: the scheduler could not be asked
  jobs_queued: number;
  dashboard_path: string; // relative to the server's base URL; "" when not reachable
  slurm_note: string;
  kernel_host: string;
}

export interface IAllocation {
  name: string;
  job_id: string;
  request: { [key: string]: any };
  state: string; // queued, running, releasing, released, ended
  reason: string;
  nodes: string[];
  estimated_start: string;
  position: number | null;
  started_at: number | null;
  steps: number;
  message: string;
}

export interface IAllocations {
  allocations: IAllocation[];
  allowed: string[];
}

/** An answer that is not 2xx, with the server's own message (the magics show the same). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
  }
}

const settings = ServerConnection.makeSettings();

export async function request<T>(
  path: string,
  init: RequestInit = {}
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'aifab/api', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (err) {
    throw new ApiError(0, `the session's server did not answer: ${err}`);
  }
  const text = await response.text();
  let body: any = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    // Jupyter's APIHandler answers errors as {"message": ...}
    const message = (body && (body.message || body.reason)) || response.statusText;
    throw new ApiError(response.status, `${response.status}: ${message}`);
  }
  return body as T;
}

export const getSession = () => request<ISession>('session');
export const listServices = () => request<IService[]>('services');
export const createService = (spec: object) =>
  request<IService>('services', { method: 'POST', body: JSON.stringify(spec) });
export const stopService = (name: string) =>
  request<IService>(`services/${encodeURIComponent(name)}`, { method: 'DELETE' });
export const getLogs = (name: string, n = 200) =>
  request<{ name: string; lines: string[] }>(
    `services/${encodeURIComponent(name)}/logs?n=${n}`
  );
export const getProgress = (name: string) =>
  request<IProgress>(`services/${encodeURIComponent(name)}/progress`);
export const resumeRun = (name: string) =>
  request<IService>(`services/${encodeURIComponent(name)}/resume`, { method: 'POST' });
export const listDask = () => request<IDaskCluster[]>('dask');
export const listAllocations = () => request<IAllocations>('allocations');
export const releaseAllocation = (name: string) =>
  request<IAllocation>(`allocations/${encodeURIComponent(name)}`, { method: 'DELETE' });

/** A path of this server (the dask dashboard through jupyter-server-proxy) as a link. */
export const serverUrl = (path: string) => URLExt.join(settings.baseUrl, path);

/**
 * The browser's address of a service's OpenAI endpoint, through the hub: the hub's public
 * URL when it told the session, else the address this page itself came from. Never the
 * server-internal URL (127.0.0.1:PORT) that a kernel uses.
 */
export function browserUrl(session: ISession | null, name: string): string {
  const base =
    (session && session.public_url) ||
    URLExt.join(window.location.origin, settings.baseUrl);
  return URLExt.join(base, 'aifab/proxy', encodeURIComponent(name), 'v1') + '/';
}

/** The OpenAI client snippet for a served model: a JupyterHub token is the API key. */
export function openaiSnippet(url: string, model: string): string {
  return [
    'from openai import OpenAI',
    '# api_key: a JupyterHub token (hub: Token page), or $JUPYTERHUB_API_TOKEN in a session',
    `client = OpenAI(base_url="${url.replace(/\/$/, '')}", api_key=TOKEN)`,
    `client.chat.completions.create(model="${model}", ` +
      'messages=[{"role": "user", "content": "Hello"}])'
  ].join('\n');
}
