import type { HostInfo } from './host-info.js';
import { Agent, request } from 'undici';
import type { JobRecord } from './migration/jobs.js';
import type { Forecast } from './migration/forecast.js';
import type { DomainInfo } from './agent/domain-manager.js';

export class AgentHttpError extends Error {
  readonly status: number;
  readonly code: string;
  readonly body: Record<string, unknown>;
  constructor(status: number, body: Record<string, unknown>, what: string) {
    super(`${what}: ${status} ${String(body.code ?? '')} ${String(body.message ?? '')}`.trim());
    this.status = status;
    this.code = String(body.code ?? 'unknown');
    this.body = body;
  }
}

/** No answer at all from the agent (refused, no route, name unknown, timed out). */
export class AgentUnreachableError extends Error {
  readonly url: string;
  constructor(url: string, cause: Error) {
    super(`cannot reach the agent at ${url}: ${(cause as NodeJS.ErrnoException).code ?? cause.message}`, { cause });
    this.name = 'AgentUnreachableError';
    this.url = url;
  }
}

/** A small typed client for one agent: what the CLI, the demo and the tests speak. */
export class AgentClient {
  readonly baseUrl: string;
  private readonly token?: string;
  private readonly dispatcher?: Agent;

  /** `ca`: trust this CA for an https agent (otherwise the system's, and NODE_EXTRA_CA_CERTS). */
  constructor(baseUrl: string, token?: string, opts: { ca?: Buffer } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.token = token;
    if (opts.ca) this.dispatcher = new Agent({ connect: { ca: opts.ca } });
  }

  async call<T>(method: string, path: string, body?: unknown, contentType = 'application/json'): Promise<T> {
    const res = await request(this.baseUrl + path, {
      method: method as 'GET',
      headers: {
        ...(body !== undefined ? { 'content-type': contentType } : {}),
        ...(this.token ? { authorization: `Bearer ${this.token}` } : {}),
      },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
      headersTimeout: 0,
      bodyTimeout: 0,
      ...(this.dispatcher ? { dispatcher: this.dispatcher } : {}),
    }).catch((err: Error) => {
      throw new AgentUnreachableError(this.baseUrl, err);
    });
    const text = await res.body.text();
    const parsed = text && res.headers['content-type']?.toString().includes('json') ? JSON.parse(text) : text;
    if (res.statusCode >= 400) {
      throw new AgentHttpError(res.statusCode, typeof parsed === 'object' ? parsed : { message: parsed }, `${method} ${path}`);
    }
    return parsed as T;
  }

  host() {
    return this.call<Pick<HostInfo, 'uuid' | 'accelerator' | 'qemuVersion' | 'hostname' | 'qemuUser' | 'migrationChannels' | 'postcopy'>>('GET', '/host');
  }
  define(xml: string) {
    return this.call<DomainInfo>('POST', '/domains', xml, 'application/xml');
  }
  domains() {
    return this.call<DomainInfo[]>('GET', '/domains');
  }
  domain(name: string) {
    return this.call<DomainInfo>('GET', `/domains/${encodeURIComponent(name)}`);
  }
  xml(name: string) {
    return this.call<string>('GET', `/domains/${encodeURIComponent(name)}/xml`);
  }
  lifecycle(name: string, verb: 'start' | 'shutdown' | 'destroy' | 'suspend' | 'resume') {
    return this.call<DomainInfo>('POST', `/domains/${encodeURIComponent(name)}/${verb}`);
  }
  undefine(name: string) {
    return this.call<string>('DELETE', `/domains/${encodeURIComponent(name)}`);
  }
  perform(body: Record<string, unknown>, wait = false) {
    return this.call<{ job: JobRecord }>('POST', `/perform${wait ? '?wait=true' : ''}`, body);
  }
  jobs() {
    return this.call<JobRecord[]>('GET', '/jobs');
  }
  job(id: string) {
    return this.call<JobRecord>('GET', `/jobs/${encodeURIComponent(id)}`);
  }
  forecast(req: { domain: string; destination?: string; bandwidthMiBps?: number; downtimeLimitMs?: number; allowPostcopy?: boolean }) {
    return this.call<Forecast>('POST', '/forecast', req);
  }

  tune(id: string, tuning: { bandwidthMiBps?: number; downtimeLimitMs?: number }) {
    return this.call<JobRecord>('PATCH', `/jobs/${encodeURIComponent(id)}`, tuning);
  }

  cancel(id: string) {
    return this.call<JobRecord>('POST', `/jobs/${encodeURIComponent(id)}/cancel`);
  }

  /** POST /jobs/{id}/complete: switch the stream to postcopy, or pause the guest so the rest copies (mode absent: the agent's choice). */
  complete(id: string, mode?: 'postcopy' | 'pause') {
    return this.call<JobRecord>('POST', `/jobs/${encodeURIComponent(id)}/complete`, mode ? { mode } : {});
  }

  /** POST /jobs/{id}/recover: a fresh round of recovery of a broken postcopy stream. */
  recoverPostcopy(id: string) {
    return this.call<JobRecord>('POST', `/jobs/${encodeURIComponent(id)}/recover`);
  }

  resolve(id: string, outcome: 'finished' | 'aborted', reason: string) {
    return this.call<JobRecord>('POST', `/jobs/${encodeURIComponent(id)}/resolve`, { outcome, reason });
  }
}
