#!/usr/bin/env node
import { parseArgs } from 'node:util';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { buildAgent } from '../src/agent/app.js';
import { DEFAULTS, parseListen, parsePortRange, type AgentConfig } from '../src/config.js';
import { AgentClient } from '../src/client.js';
import { followJob, summarize } from '../src/cli/progress.js';
import { runDemo } from '../src/cli/demo.js';

const USAGE = `usage:
  kvm-migrate agent [--listen HOST:PORT] [--state-dir DIR] [--token TOKEN] [--allow-path DIR]...
                    [--migration-address ADDR] [--migration-ports LOW-HIGH] [--accel auto|kvm|tcg]
                    [--incoming-timeout SECONDS] [--max-incoming N] [--max-outgoing N] [--job-history N] [--log-level LEVEL]
                    [--debug-hold prepare2|before-finish2|finish2]...   (fault-injection rigs only)
  kvm-migrate migrate DOMAIN --from URL --to URL [--token TOKEN] [--offline] [--paused]
                    [--bandwidth MiB/s] [--downtime MS] [--auto-converge] [--undefine-source]
                    [--no-persist] [--desturi tcp://HOST:PORT] [--migration-id ID] [--progress-timeout SECONDS]
                    [--max-downtime MS]   (convergence: raise the downtime limit up to MS when stuck)
  kvm-migrate jobs --on URL [--token TOKEN]      (one line per migration job of that agent)
  kvm-migrate resolve JOB --on URL --outcome finished|aborted --reason TEXT [--token TOKEN]
                    (a source job stuck on Finish2, the destination checked by hand: finished =
                    the guest runs there, end the paused copy here; aborted = resume it here)
  kvm-migrate demo [--keep-going]
Every flag can also be set as KVM_MIGRATE_<FLAG> (e.g. KVM_MIGRATE_TOKEN); --allow-path takes a
colon-separated list there.`;

/** A flag's value: the command line first, then KVM_MIGRATE_<FLAG>. */
function flag(values: Record<string, unknown>, name: string): string | undefined {
  const v = values[name];
  if (typeof v === 'string') return v;
  return process.env[`KVM_MIGRATE_${name.toUpperCase().replace(/-/g, '_')}`];
}

function intFlag(values: Record<string, unknown>, name: string, fallback?: number, min = 1): number | undefined {
  const v = flag(values, name);
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n) || n < min) throw new Error(`--${name} must be a number of at least ${min}, got ${v}`);
  return n;
}

async function agentCommand(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      listen: { type: 'string' },
      'state-dir': { type: 'string' },
      token: { type: 'string' },
      'allow-path': { type: 'string', multiple: true },
      'migration-address': { type: 'string' },
      'migration-ports': { type: 'string' },
      accel: { type: 'string' },
      'incoming-timeout': { type: 'string' },
      'max-incoming': { type: 'string' },
      'max-outgoing': { type: 'string' },
      'job-history': { type: 'string' },
      'log-level': { type: 'string' },
      'qemu-binary': { type: 'string' },
      'debug-hold': { type: 'string', multiple: true },
    },
  });
  const listen = parseListen(flag(values, 'listen') ?? DEFAULTS.listen);
  const stateDir = path.resolve(flag(values, 'state-dir') ?? '/var/lib/kvm-migrate');
  const allowFromEnv = process.env.KVM_MIGRATE_ALLOW_PATH?.split(':').filter(Boolean) ?? [];
  const allowPaths = values['allow-path']?.length ? values['allow-path'] : allowFromEnv;
  if (allowPaths.length === 0) {
    const images = path.join(stateDir, 'images');
    await fs.mkdir(images, { recursive: true });
    allowPaths.push(images);
  }
  const config: AgentConfig = {
    listenHost: listen.host,
    listenPort: listen.port,
    stateDir,
    token: flag(values, 'token'),
    migrationAddress: flag(values, 'migration-address') ?? listen.host,
    migrationPorts: parsePortRange(flag(values, 'migration-ports') ?? DEFAULTS.migrationPorts),
    allowPaths,
    accel: (flag(values, 'accel') ?? DEFAULTS.accel) as AgentConfig['accel'],
    incomingTimeoutSeconds: intFlag(values, 'incoming-timeout', DEFAULTS.incomingTimeoutSeconds)!,
    bodyLimitBytes: DEFAULTS.bodyLimitBytes,
    qemuBinary: flag(values, 'qemu-binary'),
    maxIncoming: intFlag(values, 'max-incoming', DEFAULTS.maxIncoming)!,
    maxOutgoing: intFlag(values, 'max-outgoing', DEFAULTS.maxOutgoing)!,
    jobHistory: intFlag(values, 'job-history', DEFAULTS.jobHistory)!,
    debugHolds: values['debug-hold'] ?? process.env.KVM_MIGRATE_DEBUG_HOLD?.split(',').filter(Boolean) ?? [],
  };
  const app = await buildAgent(config, { logger: { level: flag(values, 'log-level') ?? 'info' } });
  await app.listen({ host: config.listenHost, port: config.listenPort });
  // Guests outlive the agent: stopping it only closes connections.
  const stop = (signal: string) => {
    app.log.info({ signal }, 'stopping agent; guests keep running');
    void app.close().then(() => process.exit(0));
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
}

async function migrateCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      from: { type: 'string' },
      to: { type: 'string' },
      token: { type: 'string' },
      offline: { type: 'boolean' },
      paused: { type: 'boolean' },
      bandwidth: { type: 'string' },
      downtime: { type: 'string' },
      'auto-converge': { type: 'boolean' },
      'undefine-source': { type: 'boolean' },
      'no-persist': { type: 'boolean' },
      desturi: { type: 'string' },
      'migration-id': { type: 'string' },
      'progress-timeout': { type: 'string' },
      'max-downtime': { type: 'string' },
    },
  });
  const domain = positionals[0];
  const from = flag(values, 'from');
  const to = flag(values, 'to');
  if (!domain || !from || !to) throw new Error('migrate needs DOMAIN, --from URL and --to URL');
  const client = new AgentClient(from, flag(values, 'token'));
  const bandwidth = intFlag(values, 'bandwidth');
  const downtime = intFlag(values, 'downtime');
  const maxDowntime = intFlag(values, 'max-downtime');
  const progressTimeout = intFlag(values, 'progress-timeout', undefined, 0); // 0 = never
  const { job } = await client.perform({
    domain,
    destination: to,
    live: !values.offline,
    paused: values.paused === true,
    autoConverge: values['auto-converge'] === true,
    undefineSource: values['undefine-source'] === true,
    persistDestination: values['no-persist'] !== true,
    ...(bandwidth ? { bandwidthMiBps: bandwidth } : {}),
    ...(downtime ? { downtimeLimitMs: downtime } : {}),
    ...(maxDowntime !== undefined ? { maxDowntimeMs: maxDowntime } : {}),
    ...(progressTimeout !== undefined ? { progressTimeoutSeconds: progressTimeout } : {}),
    ...(values.desturi ? { desturi: values.desturi } : {}),
    ...(values['migration-id'] ? { migrationId: values['migration-id'] } : {}),
  });
  process.stderr.write(`migration ${job.id}: ${domain} ${from} -> ${to}\n`);
  // Ctrl-C cancels the migration (the guest stays on the source) instead of abandoning it.
  const onInterrupt = () => {
    process.stderr.write('\ncancelling...\n');
    void client.cancel(job.id).catch((err: Error) => process.stderr.write(`cancel refused: ${err.message}\n`));
  };
  process.on('SIGINT', onInterrupt);
  const final = await followJob(client, job.id, process.stderr);
  process.off('SIGINT', onInterrupt);
  process.stdout.write(`${summarize(final)}\n`);
  return final.status === 'completed' ? 0 : final.status === 'cancelled' ? 2 : 1;
}

async function jobsCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { on: { type: 'string' }, token: { type: 'string' } } });
  const on = flag(values, 'on');
  if (!on) throw new Error('jobs needs --on URL');
  for (const job of await new AgentClient(on, flag(values, 'token')).jobs()) {
    const fields = [job.id, job.role, job.domain, job.status, job.phase, job.createdAt];
    if (job.status !== 'running') fields.push(summarize(job));
    if (job.waiting) fields.push(`WAITING: ${job.waiting}`);
    process.stdout.write(`${fields.join('  ')}\n`);
  }
  return 0;
}

async function resolveCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { on: { type: 'string' }, token: { type: 'string' }, outcome: { type: 'string' }, reason: { type: 'string' } },
  });
  const [id] = positionals;
  const on = flag(values, 'on');
  const { outcome, reason } = values;
  if (!id || !on || (outcome !== 'finished' && outcome !== 'aborted') || !reason) {
    throw new Error('resolve needs JOB, --on URL, --outcome finished|aborted and --reason TEXT');
  }
  const job = await new AgentClient(on, flag(values, 'token')).resolve(id, outcome, reason);
  process.stdout.write(`${summarize(job)}${job.waiting ? `; waiting: ${job.waiting}` : ''}\n`);
  return job.status === 'running' ? 3 : 0;
}

async function main(): Promise<number> {
  const [command, ...rest] = process.argv.slice(2);
  switch (command) {
    case 'agent':
      await agentCommand(rest);
      return -1; // keeps running
    case 'migrate':
      return migrateCommand(rest);
    case 'jobs':
      return jobsCommand(rest);
    case 'resolve':
      return resolveCommand(rest);
    case 'demo':
      return runDemo(process.stdout);
    case undefined:
    case '-h':
    case '--help':
    case 'help':
      process.stdout.write(USAGE + '\n');
      return command === undefined ? 64 : 0;
    default:
      process.stderr.write(`unknown command ${command}\n${USAGE}\n`);
      return 64;
  }
}

main().then(
  (code) => {
    if (code >= 0) process.exit(code);
  },
  (err: Error) => {
    process.stderr.write(`kvm-migrate: ${err.message}\n`);
    process.exit(1);
  },
);
