import { setTimeout as sleep } from 'node:timers/promises';
import type { AgentClient } from '../client.js';
import type { JobRecord } from '../migration/jobs.js';

const BAR_WIDTH = 30;

function mib(bytes: number): string {
  return (bytes / 1048576).toFixed(1);
}

export function renderProgress(job: JobRecord): string {
  const s = job.stats;
  const percent = job.status === 'completed' ? 100 : (s?.percent ?? 0);
  const filled = Math.round((percent / 100) * BAR_WIDTH);
  const bar = '#'.repeat(filled) + '-'.repeat(BAR_WIDTH - filled);
  const rate = s ? `${mib(s.throughputBytesPerSec)} MiB/s` : '';
  const moved = s ? `${mib(s.transferredBytes)}/${mib(s.totalBytes)} MiB` : '';
  const extra = job.waiting ? `  (${job.waiting})` : '';
  return `[${bar}] ${String(percent).padStart(3)}%  ${job.phase.padEnd(16)} ${moved.padEnd(20)} ${rate}${extra}`;
}

/**
 * Follow a job until it ends, drawing a progress bar: redrawn in place on a terminal, one line
 * per phase or 10% step otherwise (logs stay readable).
 */
export async function followJob(client: AgentClient, id: string, out: NodeJS.WriteStream, opts: { pollMs?: number; signal?: AbortSignal } = {}): Promise<JobRecord> {
  const tty = out.isTTY === true;
  let lastLine = '';
  let lastKey = '';
  for (;;) {
    const job = await client.job(id);
    const line = renderProgress(job);
    if (tty) {
      if (line !== lastLine) out.write(`\r\x1b[2K${line}`);
    } else {
      const key = `${job.phase}:${Math.floor((job.stats?.percent ?? 0) / 10)}:${job.waiting ?? ''}`;
      if (key !== lastKey) out.write(line + '\n');
      lastKey = key;
    }
    lastLine = line;
    if (job.status !== 'running') {
      if (tty) out.write('\n');
      return job;
    }
    await sleep(opts.pollMs ?? 250, undefined, { signal: opts.signal });
  }
}

export function summarize(job: JobRecord): string {
  const t = job.timings;
  const parts = [`${job.status}`];
  if (t.totalMs !== undefined) parts.push(`total ${t.totalMs} ms`);
  if (t.qemuDowntimeMs !== undefined) parts.push(`qemu downtime ${t.qemuDowntimeMs} ms`);
  if (t.switchoverMs !== undefined) parts.push(`switch-over ${t.switchoverMs} ms`);
  if (t.aroundStreamMs !== undefined) parts.push(`${t.aroundStreamMs} ms around the stream`);
  if (job.stats) parts.push(`${mib(job.stats.transferredBytes)} MiB sent`);
  if (job.error) parts.push(`error ${job.error.code}: ${job.error.message}`);
  return parts.join(', ');
}
