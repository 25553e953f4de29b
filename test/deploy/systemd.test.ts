/**
 * deploy/systemd: what can be checked without systemd as PID 1. systemd-analyze verifies the
 * unit; its ExecStart= is then run the way systemd would run it (the env file and the unit's
 * Environment= lines with their specifiers, the credential, the state directory, the
 * capability bounding set and no-new-privileges through setpriv), and stopped as KillMode=
 * process stops it: SIGTERM to the main process alone.
 */
import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { packageRoot } from '../../src/agent/package-root.js';
import { AgentClient, type AgentHttpError } from '../../src/client.js';
import { parseSerialLog } from '../../src/guest/image.js';
import { processMatches } from '../../src/qemu/process.js';
import { freePort, killAgentQemus, qemuRecords, TEST_ACCEL, testGuest, tmpDir, waitFor } from '../helpers/agents.js';
import { agentFlagVariables, CLI, startService } from '../helpers/deploy.js';

const UNIT_PATH = path.join(packageRoot, 'deploy', 'systemd', 'kvm-migrate.service');
const ENV_FILE_PATH = path.join(packageRoot, 'deploy', 'systemd', 'kvm-migrate.env');
// The PATH systemd 252 gives a service.
const SERVICE_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const INSTALLED_COMMAND = 'kvm-migrate';

type UnitFile = Map<string, Array<{ key: string; value: string }>>;

/** The unit's sections and their settings in order; refuses what this reading does not handle. */
function parseUnit(text: string): UnitFile {
  const unit: UnitFile = new Map();
  let section: Array<{ key: string; value: string }> | undefined;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    if (line.endsWith('\\')) throw new Error(`continued lines are not read here: ${line}`);
    const header = /^\[([A-Za-z]+)\]$/.exec(line);
    if (header) {
      section = [];
      unit.set(header[1]!, section);
      continue;
    }
    const eq = line.indexOf('=');
    if (!section || eq < 1) throw new Error(`not a setting of a section: ${line}`);
    section.push({ key: line.slice(0, eq).trim(), value: line.slice(eq + 1).trim() });
  }
  return unit;
}

function settings(unit: UnitFile, section: string, key: string): string[] {
  return (unit.get(section) ?? []).filter((s) => s.key === key).map((s) => s.value);
}

function setting(unit: UnitFile, section: string, key: string): string {
  const values = settings(unit, section, key);
  if (values.length !== 1) throw new Error(`[${section}] ${key}= is set ${values.length} times`);
  return values[0]!;
}

/** The unit's specifiers this unit uses, as systemd fills them in; any other is refused. */
function expandSpecifiers(value: string, specifiers: Record<string, string>): string {
  return value.replace(/%(.)/g, (_, c: string) => {
    if (c === '%') return '%';
    const v = specifiers[c];
    if (v === undefined) throw new Error(`specifier %${c} is not handled here: ${value}`);
    return v;
  });
}

/** Environment=KEY=VALUE lines (one assignment each, no quoting: refused otherwise). */
function unitEnvironment(unit: UnitFile, specifiers: Record<string, string>): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of settings(unit, 'Service', 'Environment')) {
    const m = /^([A-Za-z_][A-Za-z0-9_]*)=(\S*)$/.exec(line);
    if (!m || /["']/.test(line)) throw new Error(`Environment=${line}: only a single unquoted KEY=VALUE is read here`);
    env[m[1]!] = expandSpecifiers(m[2]!, specifiers);
  }
  return env;
}

/** An EnvironmentFile=: its assignments, and the KVM_MIGRATE_ variables its commented examples name. */
function parseEnvFile(text: string): { assigned: Record<string, string>; commented: string[] } {
  const assigned: Record<string, string> = {};
  const commented: string[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '') continue;
    if (line.startsWith('#') || line.startsWith(';')) {
      const example = /^[#;]\s*(KVM_MIGRATE_[A-Z0-9_]*)=/.exec(line);
      if (example) commented.push(example[1]!);
      continue;
    }
    // Quotes, spaces and escapes mean something to systemd; this file has none, and keeps it so.
    const m = /^([A-Za-z_][A-Za-z0-9_]*)=([^\s"'\\]*)$/.exec(line);
    if (!m) throw new Error(`not a plain KEY=VALUE line: ${line}`);
    assigned[m[1]!] = m[2]!;
  }
  return { assigned, commented };
}

/** systemd-analyze verify of `text` saved as kvm-migrate.service; it speaks only of what is wrong. */
async function verify(dir: string, text: string): Promise<{ code: number; output: string }> {
  const unitDir = await fs.mkdtemp(path.join(dir, 'unit-'));
  const file = path.join(unitDir, 'kvm-migrate.service');
  await fs.writeFile(file, text);
  return new Promise((resolve) => {
    execFile('systemd-analyze', ['verify', file], { timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, output: `${stdout}${stderr}`.trim() });
    });
  });
}

/** The unit with its installed command replaced by this checkout's: what systemd-analyze can find here. */
function withCheckoutCommand(text: string): string {
  const line = `ExecStart=${INSTALLED_COMMAND} `;
  if (!text.includes(`\n${line}`)) throw new Error(`the unit has no ${line}... line`);
  return text.replace(`\n${line}`, `\nExecStart=${process.execPath} ${CLI} `);
}

const unitText = await fs.readFile(UNIT_PATH, 'utf8');
const unit = parseUnit(unitText);
const envFile = parseEnvFile(await fs.readFile(ENV_FILE_PATH, 'utf8'));

t.test('systemd-analyze verify passes the unit without a word, and speaks up about a broken one', async (t) => {
  const dir = await tmpDir(t);
  const clean = await verify(dir, withCheckoutCommand(unitText));
  t.same(clean, { code: 0, output: '' }, 'the unit verifies clean');

  // verify exits 0 on a misspelled key or a bad value (it ignores the line): only its silence says clean.
  const misspelled = await verify(dir, withCheckoutCommand(unitText).replace('\nProtectSystem=', '\nProtectSytem='));
  t.match(misspelled.output, /Unknown key 'ProtectSytem'/, 'a misspelled key is reported');
  const badValue = await verify(dir, withCheckoutCommand(unitText).replace('\nKillMode=process', '\nKillMode=proces'));
  t.match(badValue.output, /kill mode/i, 'a bad KillMode value is reported');
  const noBinary = await verify(dir, unitText.replace(`\nExecStart=${INSTALLED_COMMAND} `, '\nExecStart=/nonexistent/kvm-migrate '));
  t.not(noBinary.code, 0, 'an ExecStart binary that is not there fails verify');
  t.match(noBinary.output, /\/nonexistent\/kvm-migrate is not executable/);
});

t.test('a stop or restart ends the agent alone: KillMode=process, no cap on the guests\' tasks', async (t) => {
  t.equal(setting(unit, 'Service', 'KillMode'), 'process');
  t.equal(setting(unit, 'Service', 'TasksMax'), 'infinity');
  t.equal(setting(unit, 'Service', 'OOMPolicy'), 'continue', "a guest's OOM kill does not stop the agent");
  t.same(settings(unit, 'Service', 'ExecStop'), [], 'no ExecStop= that could end guests');
});

t.test('every KVM_MIGRATE_ variable of the env file and the unit is a flag of kvm-migrate agent', async (t) => {
  const flags = await agentFlagVariables();
  const named = [...Object.keys(envFile.assigned), ...envFile.commented, ...Object.keys(unitEnvironment(unit, { d: '/c', S: '/s' }))];
  t.ok(named.length >= 10, `the files name ${named.length} variables`);
  for (const name of named) t.ok(flags.has(name), `${name} is an agent flag`);
  for (const name of ['KVM_MIGRATE_TOKEN_FILE', 'KVM_MIGRATE_STATE_DIR']) t.notOk(name in envFile.assigned, `${name} is left to the unit`);
});

/**
 * What systemd sets up before ExecStart= (the credential, the state directory, the environment)
 * in a temporary directory, and ExecStart='s command line under the unit's capability bounding
 * set (minus `withoutCaps`) and no-new-privileges.
 */
async function asSystemdRunsIt(t: Test, withoutCaps: string[] = []) {
  const dir = await tmpDir(t);
  // %d: the credentials directory systemd fills from LoadCredential=; %S: /var/lib.
  const credentials = path.join(dir, 'credentials');
  await fs.mkdir(credentials, { mode: 0o700 });
  t.same(settings(unit, 'Service', 'LoadCredential'), ['token:/etc/kvm-migrate/token'], 'the one credential is the token');
  const token = 'deploy-systemd-token';
  await fs.writeFile(path.join(credentials, 'token'), `${token}\n`, { mode: 0o400 });
  const stateRoot = path.join(dir, 'lib');
  await fs.mkdir(stateRoot, { mode: 0o711 });
  const stateDir = path.join(stateRoot, setting(unit, 'Service', 'StateDirectory'));
  // StateDirectory= with its StateDirectoryMode=, as systemd makes it before ExecStart=.
  await fs.mkdir(stateDir, { mode: parseInt(setting(unit, 'Service', 'StateDirectoryMode'), 8) });
  t.teardown(() => killAgentQemus(undefined, stateDir));

  const host = '127.0.0.5';
  const port = await freePort(host);
  const env: Record<string, string> = {
    PATH: SERVICE_PATH,
    ...unitEnvironment(unit, { d: credentials, S: stateRoot }),
    ...envFile.assigned,
    // The test's own: a free port of its own address, the suite's accelerator.
    KVM_MIGRATE_LISTEN: `${host}:${port}`,
    KVM_MIGRATE_ACCEL: TEST_ACCEL,
  };
  t.equal(env.KVM_MIGRATE_STATE_DIR, stateDir, "the agent's state directory is the one StateDirectory= makes");
  t.equal(setting(unit, 'Service', 'EnvironmentFile'), '/etc/kvm-migrate/kvm-migrate.env');

  const [program, ...args] = setting(unit, 'Service', 'ExecStart').split(/\s+/);
  t.equal(program, INSTALLED_COMMAND, 'ExecStart= runs the command npm install -g installs');
  const caps = setting(unit, 'Service', 'CapabilityBoundingSet').split(/\s+/);
  for (const cap of withoutCaps) t.ok(caps.includes(cap), `the unit's bounding set has ${cap}`);
  const bounding = caps.filter((cap) => !withoutCaps.includes(cap)).map((cap) => `+${cap.replace(/^CAP_/, '').toLowerCase()}`);
  t.equal(setting(unit, 'Service', 'NoNewPrivileges'), 'yes');
  const command = ['setpriv', `--bounding-set=-all,${bounding.join(',')}`, '--no-new-privs', '--', process.execPath, CLI, ...args];
  const url = `http://${host}:${port}`;
  return { command, env, url, healthUrl: `${url}/health`, client: new AgentClient(url, token), stateDir };
}

t.test("ExecStart= as systemd runs it starts the agent with the env file's settings; a guest outlives its stop and is re-attached at the next start", async (t) => {
  const service = await asSystemdRunsIt(t);
  const { client, stateDir } = service;
  const first = await startService(t, service.command, service.env, service.healthUrl);
  t.match((await client.host()).qemuUser, /^each qemu runs as a user of its own/, 'the token from the credential opens the agent; qemu runs as users of its own');

  const guest = await testGuest(path.join(stateDir, 'images'), 'vm1');
  await client.define(guest.xml);
  const started = await client.lifecycle('vm1', 'start');
  t.equal(started.state, 'running', 'a guest starts under the bounding set');
  const [record] = await qemuRecords(stateDir);
  const passes = async () => parseSerialLog(await fs.readFile(guest.serialLog, 'utf8').catch(() => '')).lastPass ?? -1;
  await waitFor('the guest running', async () => (await passes()) >= 0);

  // systemctl stop with KillMode=process: SIGTERM to the main process only.
  first.child.kill('SIGTERM');
  t.same(await first.exited, { code: 0, signal: null }, 'the agent stops on SIGTERM');
  t.ok(processMatches(record!), 'its guest runs on');
  const passesWhileStopped = await passes();
  await waitFor('the guest making progress with no agent', async () => (await passes()) > passesWhileStopped);

  await startService(t, service.command, service.env, service.healthUrl);
  const again = await client.domain('vm1');
  t.equal(again.state, 'running', 'the next start re-attaches');
  t.equal(again.pid, started.pid, 'to the same qemu');
  t.equal((await client.lifecycle('vm1', 'destroy')).state, 'shutoff', 'and controls it');
  t.notOk(processMatches(record!), 'destroy ended that qemu');
});

t.test('the bounding set is what the guest runs under: without CAP_SETUID no qemu starts', async (t) => {
  const service = await asSystemdRunsIt(t, ['CAP_SETUID']);
  await startService(t, service.command, service.env, service.healthUrl);
  const guest = await testGuest(path.join(service.stateDir, 'images'), 'vm1');
  await service.client.define(guest.xml);
  const refused = await service.client.lifecycle('vm1', 'start').then(() => undefined, (err: AgentHttpError) => err);
  t.equal(refused?.code, 'qemu_start_failed', 'the start is refused');
  t.match(refused?.message, /spawn EPERM$/, 'the agent may not start qemu as a user of its own');
  t.same(await qemuRecords(service.stateDir), [], 'no qemu runs');
});
