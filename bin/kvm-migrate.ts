#!/usr/bin/env node
import { readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { buildAgent } from '../src/agent/app.js';
import { DEFAULTS, parseListen, parseNetworks, parsePortRange, validateConfig, type AgentConfig } from '../src/config.js';
import { parseUidRange, QemuUsers } from '../src/agent/qemu-user.js';
import { AgentClient, AgentUnreachableError } from '../src/client.js';
import { followJob, summarize } from '../src/cli/progress.js';
import { runDemo } from '../src/cli/demo.js';
import { EXIT, EXIT_CODES_HELP, UsageError } from '../src/cli/exit-codes.js';
import { chooseHostAccel } from '../src/qemu/accel-probe.js';
import { HOLD_POINTS } from '../src/migration/holds.js';
import { DEFAULT_OPTIONS, MAX_MULTIFD_CHANNELS, ONE_STREAM_MIBPS, type StreamCompression } from '../src/migration/params.js';
import { version } from '../src/agent/version.js';
import type { TlsFiles } from '../src/agent/tls.js';

const ENV_PREFIX = 'KVM_MIGRATE_';
const DEFAULT_IMAGES_DIR = 'images';
const envName = (flag: string) => ENV_PREFIX + flag.toUpperCase().replace(/-/g, '_');

/** A flag with a value, also settable as KVM_MIGRATE_<FLAG>. */
function valueOption(flags: string, description: string): Option {
  const long = /--([a-z-]+)/.exec(flags)![1]!;
  return new Option(flags, description).env(envName(long));
}

function wholeNumber(min: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!/^\d+$/.test(value.trim()) || n < min) throw new InvalidArgumentError(`must be a whole number of at least ${min}`);
    return n;
  };
}

function boundedNumber(min: number, max: number) {
  const whole = wholeNumber(min);
  return (value: string): number => {
    const n = whole(value);
    if (n > max) throw new InvalidArgumentError(`must be a whole number from ${min} to ${max}`);
    return n;
  };
}

function oneOf<T extends string>(choices: readonly T[]) {
  return (value: string): T => {
    if (!(choices as readonly string[]).includes(value)) throw new InvalidArgumentError(`must be one of ${choices.join(', ')}`);
    return value as T;
  };
}

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

/** A repeatable flag: its values on the command line, else KVM_MIGRATE_<FLAG> split at `separator`. */
function listFlag(values: string[] | undefined, flag: string, separator: string): string[] {
  return values?.length ? values : (process.env[envName(flag)]?.split(separator).filter(Boolean) ?? []);
}

const BOOLEAN_ENV = /^(?:1|true|yes|on)$|^(?:0|false|no|off)$/i;

/**
 * Commander turns a boolean flag on whenever its variable is set at all (KVM_MIGRATE_OFFLINE=0
 * too); read the variables of boolean flags given no value on the command line strictly instead.
 */
function applyBooleanEnv(cmd: Command): void {
  for (const option of cmd.options) {
    if (option.required || option.optional || option.long === '--help') continue;
    const key = option.attributeName();
    if (cmd.getOptionValueSource(key) === 'cli') continue;
    const name = envName(option.long!.slice(2));
    const raw = process.env[name];
    if (raw === undefined) continue;
    if (!BOOLEAN_ENV.test(raw)) throw new UsageError(`${name} (for ${option.long}) must be 1/true/yes/on or 0/false/no/off, got ${JSON.stringify(raw)}`);
    const on = /^(?:1|true|yes|on)$/i.test(raw);
    // KVM_MIGRATE_NO_PERSIST=1 means --no-persist given: the option's value turns false.
    cmd.setOptionValueWithSource(key, option.negate ? !on : on, 'env');
  }
}

/**
 * The operator credential: --token-file or --token, each also from its variable; the command
 * line wins over the environment, and both on the command line is a usage error.
 */
function readToken(o: { token?: string; tokenFile?: string }, cmd: Command): string | undefined {
  const fromCli = (key: string) => cmd.getOptionValueSource(key) === 'cli';
  if (o.token && o.tokenFile && fromCli('token') && fromCli('tokenFile')) throw new UsageError('give --token or --token-file, not both');
  if (o.tokenFile && !(o.token && fromCli('token'))) {
    let text: string;
    try {
      text = readFileSync(o.tokenFile, 'utf8');
    } catch (err) {
      throw new UsageError(`--token-file ${o.tokenFile}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    const token = text.trim();
    if (!token) throw new UsageError(`--token-file ${o.tokenFile} is empty`);
    return token;
  }
  return o.token;
}

function tokenOptions(cmd: Command): Command {
  return cmd
    .addOption(valueOption('--token <token>', 'bearer token (prefer --token-file or KVM_MIGRATE_TOKEN: a flag shows in ps)'))
    .addOption(valueOption('--token-file <file>', 'read the bearer token from this file'));
}

interface AgentOptions {
  listen: string;
  stateDir: string;
  token?: string;
  tokenFile?: string;
  allowPath?: string[];
  migrationAddress?: string;
  migrationPorts: string;
  accel: AgentConfig['accel'];
  incomingTimeout: number;
  maxIncoming: number;
  maxOutgoing: number;
  migrationChannels?: number;
  jobHistory: number;
  logLevel: string;
  qemuBinary?: string;
  qemuUser: string;
  qemuUids: string;
  postcopy: boolean;
  debugHold?: string[];
  network?: string[];
  graphicsListen?: string[];
  allowedHost?: string[];
  peer?: string[];
  maxDomains: number;
  maxLogSize: number;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsCrl?: string;
}

function tlsFiles(o: { tlsCert?: string; tlsKey?: string; tlsCa?: string; tlsCrl?: string }): { tls?: TlsFiles } {
  const given = [o.tlsCert, o.tlsKey, o.tlsCa].filter(Boolean).length;
  if (given === 0) {
    if (o.tlsCrl) throw new UsageError('--tls-crl goes with --tls-cert, --tls-key and --tls-ca');
    return {};
  }
  if (given < 3) throw new UsageError('--tls-cert, --tls-key and --tls-ca go together');
  return {
    tls: {
      certFile: path.resolve(o.tlsCert!),
      keyFile: path.resolve(o.tlsKey!),
      caFile: path.resolve(o.tlsCa!),
      ...(o.tlsCrl ? { crlFile: path.resolve(o.tlsCrl) } : {}),
    },
  };
}

async function agentAction(o: AgentOptions, cmd: Command): Promise<number> {
  let config: AgentConfig;
  try {
    const listen = parseListen(o.listen);
    const stateDir = path.resolve(o.stateDir);
    const allowPaths = listFlag(o.allowPath, 'allow-path', ':');
    if (allowPaths.length === 0) allowPaths.push(path.join(stateDir, DEFAULT_IMAGES_DIR));
    config = validateConfig({
      listenHost: listen.host,
      listenPort: listen.port,
      stateDir,
      token: readToken(o, cmd),
      migrationAddress: o.migrationAddress ?? listen.host,
      migrationPorts: parsePortRange(o.migrationPorts),
      allowPaths,
      accel: o.accel,
      incomingTimeoutSeconds: o.incomingTimeout,
      bodyLimitBytes: DEFAULTS.bodyLimitBytes,
      requestTimeoutMs: DEFAULTS.requestTimeoutMs,
      maxDomains: o.maxDomains,
      maxLogBytes: o.maxLogSize * 1024 * 1024,
      allowedHosts: listFlag(o.allowedHost, 'allowed-host', ','),
      peers: listFlag(o.peer, 'peer', ','),
      ...tlsFiles(o),
      qemuBinary: o.qemuBinary,
      qemuUser: o.qemuUser,
      qemuUids: parseUidRange(o.qemuUids),
      ...(o.postcopy === false ? { refusePostcopy: true } : {}),
      maxIncoming: o.maxIncoming,
      maxOutgoing: o.maxOutgoing,
      ...(o.migrationChannels !== undefined ? { migrationChannels: o.migrationChannels } : {}),
      jobHistory: o.jobHistory,
      debugHolds: listFlag(o.debugHold, 'debug-hold', ','),
      networks: parseNetworks(listFlag(o.network, 'network', ',')),
      graphicsListen: listFlag(o.graphicsListen, 'graphics-listen', ','),
    });
  } catch (err) {
    throw err instanceof UsageError ? err : new UsageError((err as Error).message);
  }
  // Only for a configuration that will run: a refused one leaves nothing behind.
  if (config.allowPaths[0] === path.join(config.stateDir, DEFAULT_IMAGES_DIR)) await mkdir(config.allowPaths[0], { recursive: true, mode: 0o700 });
  const app = await buildAgent(config, { logger: { level: o.logLevel } });
  await app.listen({ host: config.listenHost, port: config.listenPort });
  // Guests outlive the agent: stopping it only closes connections.
  const stop = (signal: string) => {
    app.log.info({ signal }, 'stopping agent; guests keep running');
    void app.close().then(() => process.exit(EXIT.ok));
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
  return -1; // keeps running
}

interface MigrateOptions {
  from: string;
  to: string;
  token?: string;
  tokenFile?: string;
  offline?: boolean;
  paused?: boolean;
  bandwidth?: number;
  downtime?: number;
  maxDowntime?: number;
  autoConverge?: boolean;
  multifdChannels?: number;
  compress?: StreamCompression;
  xbzrle?: boolean;
  dirtyLimit?: number;
  completionTimeoutPerGib?: number;
  deadlineAction?: 'pause' | 'abort' | 'postcopy';
  allowPostcopy?: boolean;
  postcopyRecovery?: number;
  undefineSource?: boolean;
  persist: boolean;
  desturi?: string;
  migrationId?: string;
  progressTimeout?: number;
}

async function migrateAction(domain: string, o: MigrateOptions, cmd: Command): Promise<number> {
  const client = new AgentClient(o.from, readToken(o, cmd));
  const { job } = await client.perform({
    domain,
    destination: o.to,
    live: !o.offline,
    paused: o.paused === true,
    ...(o.autoConverge !== undefined ? { autoConverge: o.autoConverge } : {}),
    undefineSource: o.undefineSource === true,
    persistDestination: o.persist,
    ...(o.bandwidth !== undefined ? { bandwidthMiBps: o.bandwidth } : {}),
    ...(o.multifdChannels !== undefined ? { multifdChannels: o.multifdChannels } : {}),
    ...(o.compress !== undefined ? { compression: o.compress } : {}),
    ...(o.xbzrle !== undefined ? { xbzrle: o.xbzrle } : {}),
    ...(o.downtime !== undefined ? { downtimeLimitMs: o.downtime } : {}),
    ...(o.maxDowntime !== undefined ? { maxDowntimeMs: o.maxDowntime } : {}),
    ...(o.dirtyLimit !== undefined ? { dirtyLimitMiBps: o.dirtyLimit } : {}),
    ...(o.completionTimeoutPerGib !== undefined ? { completionTimeoutPerGiBSeconds: o.completionTimeoutPerGib } : {}),
    ...(o.deadlineAction !== undefined ? { deadlineAction: o.deadlineAction } : {}),
    ...(o.allowPostcopy !== undefined ? { allowPostcopy: o.allowPostcopy } : {}),
    ...(o.postcopyRecovery !== undefined ? { postcopyRecoverySeconds: o.postcopyRecovery } : {}),
    ...(o.progressTimeout !== undefined ? { progressTimeoutSeconds: o.progressTimeout } : {}),
    ...(o.desturi ? { desturi: o.desturi } : {}),
    ...(o.migrationId ? { migrationId: o.migrationId } : {}),
  });
  process.stderr.write(`migration ${job.id}: ${domain} ${o.from} -> ${o.to}\n`);
  // Ctrl-C cancels the migration (the guest stays on the source) instead of abandoning it.
  const onInterrupt = () => {
    process.stderr.write('\ncancelling...\n');
    void client.cancel(job.id).catch((err: Error) => process.stderr.write(`cancel refused: ${err.message}\n`));
  };
  process.on('SIGINT', onInterrupt);
  const final = await followJob(client, job.id, process.stderr);
  process.off('SIGINT', onInterrupt);
  process.stdout.write(`${summarize(final)}\n`);
  return final.status === 'completed' ? EXIT.ok : final.status === 'cancelled' ? EXIT.cancelled : EXIT.failed;
}

async function jobsAction(o: { on: string; token?: string; tokenFile?: string }, cmd: Command): Promise<number> {
  for (const job of await new AgentClient(o.on, readToken(o, cmd)).jobs()) {
    const fields = [job.id, job.role, job.domain, job.status, job.phase, job.createdAt];
    if (job.status !== 'running') fields.push(summarize(job));
    if (job.waiting) fields.push(`WAITING: ${job.waiting}`);
    process.stdout.write(`${fields.join('  ')}\n`);
  }
  return EXIT.ok;
}

async function resolveAction(id: string, o: { on: string; token?: string; tokenFile?: string; outcome: 'finished' | 'aborted'; reason: string }, cmd: Command): Promise<number> {
  const job = await new AgentClient(o.on, readToken(o, cmd)).resolve(id, o.outcome, o.reason);
  process.stdout.write(`${summarize(job)}${job.waiting ? `; waiting: ${job.waiting}` : ''}\n`);
  return job.status === 'running' ? EXIT.inProgress : EXIT.ok;
}

async function tuneAction(id: string, o: { on: string; token?: string; tokenFile?: string; bandwidth?: number; downtime?: number }, cmd: Command): Promise<number> {
  if (o.bandwidth === undefined && o.downtime === undefined) throw new UsageError('give --bandwidth, --downtime or both');
  const tuning = { ...(o.bandwidth !== undefined ? { bandwidthMiBps: o.bandwidth } : {}), ...(o.downtime !== undefined ? { downtimeLimitMs: o.downtime } : {}) };
  const job = await new AgentClient(o.on, readToken(o, cmd)).tune(id, tuning);
  process.stdout.write(`${job.id}: ${job.phase}, bandwidth ${job.options.bandwidthMiBps ?? 'unlimited'} MiB/s, downtime limit ${job.options.downtimeLimitMs ?? 'default'} ms\n`);
  return EXIT.ok;
}

async function completeAction(id: string, o: { on: string; token?: string; tokenFile?: string; mode?: 'postcopy' | 'pause' }, cmd: Command): Promise<number> {
  const job = await new AgentClient(o.on, readToken(o, cmd)).complete(id, o.mode);
  process.stdout.write(`${job.id}: completing by ${job.completeRequested?.mode ?? o.mode}\n`);
  return EXIT.ok;
}

async function recoverAction(id: string, o: { on: string; token?: string; tokenFile?: string }, cmd: Command): Promise<number> {
  const job = await new AgentClient(o.on, readToken(o, cmd)).recoverPostcopy(id);
  process.stdout.write(`${job.id}: recovering the postcopy stream (${job.stats?.postcopy?.recoveries ?? 0} recovered before)\n`);
  return EXIT.ok;
}

async function demoAction(): Promise<number> {
  const abort = new AbortController();
  // The first signal is the reason; a second one while it cleans up changes nothing.
  const onSignal = (signal: NodeJS.Signals) => abort.abort(signal);
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const code = await runDemo(process.stdout, abort.signal);
  return abort.signal.aborted ? 128 + os.constants.signals[abort.signal.reason as NodeJS.Signals] : code;
}

async function checkAccelAction(o: { qemuBinary?: string; qemuUser: string; qemuUids: string }): Promise<number> {
  const users = await QemuUsers.resolve(o.qemuUser, parseUidRange(o.qemuUids));
  const choice = await chooseHostAccel({ binary: o.qemuBinary, credentials: users.probeCredentials() });
  process.stderr.write(`accelerator ${choice.reason}\n`);
  process.stdout.write(`${choice.accel}\n`);
  return EXIT.ok;
}

function buildProgram(run: (code: Promise<number>) => void): Command {
  const program = new Command('kvm-migrate')
    .description('Per-host agent that runs qemu guests from libvirt domain XML and live-migrates them (protocol v2), and its client.')
    .version(version, '-V, --version')
    .addHelpText('after', `\nEvery flag can also be set as ${ENV_PREFIX}<FLAG> (e.g. ${ENV_PREFIX}TOKEN_FILE); boolean flags take 1/0, true/false, yes/no, on/off.\n${EXIT_CODES_HELP}`)
    .showHelpAfterError('(add --help for usage)')
    .exitOverride();

  program
    .command('agent')
    .description('run the agent of this host')
    .addOption(valueOption('--listen <host:port>', 'HTTP(S) address').default(DEFAULTS.listen))
    .addOption(valueOption('--state-dir <dir>', 'definitions, runtime records, jobs, sockets, logs (one agent per directory)').default('/var/lib/kvm-migrate'))
    .addOption(new Option('--allow-path <dir>', `disks, kernels, serial/log files must lie below one (repeatable; ${ENV_PREFIX}ALLOW_PATH: colon-separated; default STATE_DIR/images)`).argParser(collect))
    .addOption(valueOption('--migration-address <addr>', 'the address peers send migration streams to (default: the listen host; required when that is 0.0.0.0 or ::)'))
    .addOption(new Option('--allowed-host <name>', `a DNS name callers and peers use for this agent, besides its addresses, localhost and ${'`hostname`'} (repeatable; ${ENV_PREFIX}ALLOWED_HOST: comma-separated); any other Host header is refused (DNS rebinding)`).argParser(collect))
    .addOption(valueOption('--tls-cert <file>', "this agent's certificate (from the fleet's CA; scripts/make-certs.sh): HTTPS, mutual TLS to peers, qemu's TLS stream"))
    .addOption(valueOption('--tls-key <file>', 'its private key'))
    .addOption(valueOption('--tls-ca <file>', "the fleet's CA certificate: peers must present a certificate it signed"))
    .addOption(valueOption('--tls-crl <file>', "the CA's list of revoked certificates (scripts/make-certs.sh DIR --revoke NAME): peers presenting one are refused"))
    .addOption(new Option('--graphics-listen <addr>', `an address of this host a guest's VNC display may listen on besides loopback (repeatable; ${ENV_PREFIX}GRAPHICS_LISTEN: comma-separated); a display has no password, so it opens the guest's console to whoever reaches the address`).argParser(collect))
    .addOption(new Option('--network <name=bridge>', `a libvirt network (<interface type='network'><source network='NAME'/>) and the bridge of this host its guests' taps go on (repeatable; ${ENV_PREFIX}NETWORK: comma-separated)`).argParser(collect))
    .addOption(new Option('--peer <url>', `without TLS: an agent URL this one may migrate to (repeatable; ${ENV_PREFIX}PEER: comma-separated); an agent on loopback may also reach any loopback one`).argParser(collect))
    .addOption(valueOption('--migration-ports <low-high>', 'incoming stream ports').default(DEFAULTS.migrationPorts))
    .addOption(valueOption('--accel <accel>', 'auto: KVM where it works (measured at start; GET /host says how fast), else TCG').argParser(oneOf(['auto', 'kvm', 'tcg'] as const)).default(DEFAULTS.accel))
    .addOption(valueOption('--incoming-timeout <seconds>', 'lease of a prepared destination').argParser(wholeNumber(1)).default(DEFAULTS.incomingTimeoutSeconds))
    .addOption(valueOption('--max-incoming <n>', 'concurrent incoming migrations').argParser(wholeNumber(1)).default(DEFAULTS.maxIncoming))
    .addOption(valueOption('--max-outgoing <n>', 'concurrent outgoing migrations').argParser(wholeNumber(1)).default(DEFAULTS.maxOutgoing))
    .addOption(valueOption('--migration-channels <n>', `the most parallel stream connections (multifd) one migration uses here, either way; 1: never multifd (default: 8; with --tls one per core, at most 8; a migration uses the lower of both agents')`).argParser(boundedNumber(1, MAX_MULTIFD_CHANNELS)))
    .addOption(valueOption('--max-domains <n>', 'domains this agent holds at most, defined and arriving').argParser(wholeNumber(1)).default(DEFAULTS.maxDomains))
    .addOption(valueOption('--max-log-size <MiB>', "a guest's serial or chardev log file over this is truncated").argParser(wholeNumber(1)).default(DEFAULTS.maxLogBytes / 1024 / 1024))
    .addOption(valueOption('--job-history <n>', 'ended migration jobs kept per domain').argParser(wholeNumber(1)).default(DEFAULTS.jobHistory))
    .addOption(valueOption('--log-level <level>', 'fatal, error, warn, info, debug, trace').argParser(oneOf(['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const)).default('info'))
    .addOption(valueOption('--qemu-binary <path>', 'qemu-system-x86_64 to run (default: from PATH)'))
    .addOption(valueOption('--qemu-user <who>', "whom qemu runs as: dynamic (a user id of its own per qemu, from --qemu-uids), an account name, or root").default(DEFAULTS.qemuUser))
    .addOption(valueOption('--qemu-uids <first-last>', 'the user ids --qemu-user dynamic hands out (no account may use them)').default(`${DEFAULTS.qemuUids.first}-${DEFAULTS.qemuUids.last}`))
    .addOption(new Option('--no-postcopy', `this host's qemus receive no postcopy stream: none is handed userfaultfd (${ENV_PREFIX}NO_POSTCOPY set: the same); a migration that asks for postcopy is refused, a default one streams without it`).env(envName('no-postcopy')))
    .addOption(new Option('--debug-hold <point>', `fault-injection rigs only: stop at ${HOLD_POINTS.join('|')} until STATE_DIR/hold.POINT is removed (repeatable; ${ENV_PREFIX}DEBUG_HOLD: comma-separated)`).argParser(collect).hideHelp())
    .addHelpText('after', '\nThe agent keeps running until SIGTERM or SIGINT; guests outlive it.')
    .action((o: AgentOptions, cmd: Command) => run(agentAction(o, cmd)));
  tokenOptions(program.commands.at(-1)!);

  tokenOptions(
    program
      .command('migrate')
      .description('live-migrate DOMAIN from one agent to another, with a progress bar; Ctrl-C cancels')
      .argument('<domain>', 'the domain to migrate')
      .addOption(valueOption('--from <url>', 'the source agent').makeOptionMandatory())
      .addOption(valueOption('--to <url>', 'the destination agent').makeOptionMandatory())
      .option('--offline', 'pause the guest before the stream (not live)')
      .option('--paused', 'leave the guest paused on the destination')
      .addOption(valueOption('--bandwidth <MiB/s>', 'stream bandwidth limit').argParser(wholeNumber(1)))
      .addOption(valueOption('--downtime <ms>', 'downtime limit').argParser(wholeNumber(1)))
      .addOption(valueOption('--max-downtime <ms>', `convergence: raise the downtime limit up to this when the stream stalls (default ${DEFAULT_OPTIONS.maxDowntimeMs})`).argParser(wholeNumber(1)))
      .option('--auto-converge', "convergence may throttle the guest's vCPUs once the downtime schedule is spent (the default)")
      .option('--no-auto-converge', "convergence never throttles the guest's vCPUs")
      .addOption(valueOption('--dirty-limit <MiB/s>', 'convergence throttles by a per-vCPU dirty-rate limit instead (KVM with a dirty ring only; else auto-converge)').argParser(wholeNumber(1)))
      .addOption(valueOption('--completion-timeout-per-gib <seconds>', `the completion deadline per GiB of guest RAM (default ${DEFAULT_OPTIONS.completionTimeoutPerGiBSeconds}; 0 = none)`).argParser(wholeNumber(0)))
      .addOption(valueOption('--deadline-action <action>', `at the deadline: pause (the guest pauses for the rest of the copy), postcopy (needs --allow-postcopy; the default where the stream is set up for postcopy) or abort (the default otherwise)`).argParser(oneOf(['pause', 'abort', 'postcopy'] as const)))
      .option('--allow-postcopy', 'the stream may switch to postcopy (once the downtime schedule is spent, at the deadline, or `kvm-migrate complete`); one plain stream; the destination must support it')
      .option('--no-allow-postcopy', `never postcopy (by default it is armed where the stream is one plain stream anyway, e.g. --bandwidth at most ${ONE_STREAM_MIBPS}, and the destination can take it)`)
      .addOption(valueOption('--postcopy-recovery <seconds>', `how long the agents recover a broken postcopy stream by themselves (default ${DEFAULT_OPTIONS.postcopyRecoverySeconds})`).argParser(wholeNumber(1)))
      .addOption(valueOption('--multifd-channels <n>', 'at most this many parallel stream connections (default: the agents choose, the lower of their limits; 1: one plain stream)').argParser(boundedNumber(1, MAX_MULTIFD_CHANNELS)))
      .addOption(valueOption('--compress <method>', "compress the stream's pages: none or zstd (both agents agree; see the README's Benchmark for when it pays)").argParser(oneOf(['none', 'zstd'] as const)))
      .option('--xbzrle', 'send re-dirtied pages as deltas (one plain stream; see the README for when it pays)')
      .option('--undefine-source', 'remove the definition from the source afterwards')
      .option('--no-persist', 'do not store the definition on the destination (transient there)')
      .addOption(valueOption('--desturi <uri>', 'tcp://HOST:PORT the destination listens on'))
      .addOption(valueOption('--migration-id <id>', 'idempotency key'))
      .addOption(valueOption('--progress-timeout <seconds>', 'cancel a stream that makes no progress for this long (0 = never)').argParser(wholeNumber(0)))
      .addHelpText('after', `\nExit codes: 0 completed, 1 failed, 2 cancelled, 64 usage error, 69 agent unreachable.`)
      .action((domain: string, _opts: MigrateOptions, cmd: Command) => {
        applyBooleanEnv(cmd);
        run(migrateAction(domain, cmd.opts<MigrateOptions>(), cmd));
      }),
  );

  tokenOptions(
    program
      .command('jobs')
      .description("one line per migration job of an agent; WAITING and why when one is stuck")
      .addOption(valueOption('--on <url>', 'the agent').makeOptionMandatory())
      .action((o: { on: string; token?: string; tokenFile?: string }, cmd: Command) => run(jobsAction(o, cmd))),
  );

  tokenOptions(
    program
      .command('tune')
      .description("change a running migration's stream limits on its source agent, applied to qemu at once")
      .argument('<job>', 'the job id on the source agent')
      .addOption(valueOption('--on <url>', 'the source agent').makeOptionMandatory())
      .addOption(valueOption('--bandwidth <MiB/s>', 'stream bandwidth limit').argParser(wholeNumber(1)))
      .addOption(valueOption('--downtime <ms>', 'downtime limit').argParser(wholeNumber(1)))
      .addHelpText('after', '\nExit codes: 0 applied, 1 refused (the stream has completed, or not a source job), 64 usage error, 69 agent unreachable.')
      .action((id: string, o: { on: string; token?: string; tokenFile?: string; bandwidth?: number; downtime?: number }, cmd: Command) => run(tuneAction(id, o, cmd))),
  );

  tokenOptions(
    program
      .command('complete')
      .description('complete a running migration now: switch it to postcopy (where its stream is set up for it: --allow-postcopy, or by default on one plain stream), or pause the guest so the rest copies')
      .argument('<job>', 'the job id on the source agent')
      .addOption(valueOption('--on <url>', 'the source agent').makeOptionMandatory())
      .addOption(valueOption('--mode <mode>', 'postcopy or pause (default: postcopy where the migration allows it, else pause)').argParser(oneOf(['postcopy', 'pause'] as const)))
      .addHelpText('after', '\nExit codes: 0 asked (carried out within a quarter second), 1 refused, 64 usage error, 69 agent unreachable.')
      .action((id: string, o: { on: string; token?: string; tokenFile?: string; mode?: 'postcopy' | 'pause' }, cmd: Command) => run(completeAction(id, o, cmd))),
  );

  tokenOptions(
    program
      .command('recover')
      .description('recover a broken postcopy stream again, after the agents gave up by themselves (the link must be back)')
      .argument('<job>', 'the job id on the source agent')
      .addOption(valueOption('--on <url>', 'the source agent').makeOptionMandatory())
      .addHelpText('after', '\nExit codes: 0 asked, 1 refused (not following a postcopy stream), 64 usage error, 69 agent unreachable.')
      .action((id: string, o: { on: string; token?: string; tokenFile?: string }, cmd: Command) => run(recoverAction(id, o, cmd))),
  );

  tokenOptions(
    program
      .command('resolve')
      .description('decide a source job stuck on Finish2 after checking the destination by hand')
      .argument('<job>', 'the job id on the source agent')
      .addOption(valueOption('--on <url>', 'the source agent').makeOptionMandatory())
      .addOption(valueOption('--outcome <outcome>', 'finished: the guest runs there, end the paused copy here; aborted: resume it here').argParser(oneOf(['finished', 'aborted'] as const)).makeOptionMandatory())
      .addOption(valueOption('--reason <text>', 'why; kept in the job record').makeOptionMandatory())
      .addHelpText('after', '\nExit codes: 0 carried out, 1 refused, 3 recorded and still being carried out, 64 usage error, 69 agent unreachable.')
      .action((id: string, o: { on: string; token?: string; tokenFile?: string; outcome: 'finished' | 'aborted'; reason: string }, cmd: Command) => run(resolveAction(id, o, cmd))),
  );

  program
    .command('demo')
    .description("start two agents on 127.0.0.2 and 127.0.0.3 and migrate the project's test guest there and back; everything it starts is ended on exit, Ctrl-C included")
    .addHelpText('after', '\nExit codes: 0 passed, 1 failed, 130/143 interrupted by SIGINT/SIGTERM (after ending what it started).')
    .action(() => run(demoAction()));

  program
    .command('check-accel')
    .description('measure KVM and TCG with the test guest; print the faster usable one on stdout and the figures on stderr')
    .addOption(valueOption('--qemu-binary <path>', 'qemu-system-x86_64 to measure (default: from PATH)'))
    .addOption(valueOption('--qemu-user <who>', 'whom the agent runs qemu as: KVM counts only where that user may open it').default(DEFAULTS.qemuUser))
    .addOption(valueOption('--qemu-uids <first-last>', 'as the agent is given it').default(`${DEFAULTS.qemuUids.first}-${DEFAULTS.qemuUids.last}`))
    .action((o: { qemuBinary?: string; qemuUser: string; qemuUids: string }) => run(checkAccelAction(o)));

  return program;
}

function exitCodeOf(err: unknown): number {
  if (err instanceof CommanderError) {
    return ['commander.helpDisplayed', 'commander.version', 'commander.help'].includes(err.code) ? EXIT.ok : EXIT.usage;
  }
  if (err instanceof UsageError) return EXIT.usage;
  if (err instanceof AgentUnreachableError) return EXIT.unreachable;
  return EXIT.failed;
}

function finish(err: unknown): void {
  if (!(err instanceof CommanderError)) process.stderr.write(`kvm-migrate: ${(err as Error).message}\n`);
  process.exit(exitCodeOf(err));
}

const program = buildProgram((code) => {
  code.then((c) => {
    if (c >= 0) process.exit(c);
  }, finish);
});
try {
  if (process.argv.length <= 2) {
    program.outputHelp({ error: true });
    process.exit(EXIT.usage);
  }
  program.parse(process.argv);
} catch (err) {
  finish(err);
}
