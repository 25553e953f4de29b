import t from 'tap';
import { spawn } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { runCli } from '../helpers/cli.js';
import { packageRoot } from '../../src/agent/package-root.js';
import { version } from '../../src/agent/version.js';
import { processesMentioning } from '../qemu/helpers.js';

const COMMANDS = ['agent', 'migrate', 'jobs', 'tune', 'resolve', 'demo', 'check-accel'];

t.test('--version and --help for every command', async (t) => {
  const v = await runCli(['--version']);
  t.equal(v.code, 0);
  t.equal(v.stdout.trim(), version, 'the package version');
  const top = await runCli(['--help']);
  t.equal(top.code, 0);
  for (const c of COMMANDS) t.match(top.stdout, new RegExp(`^  ${c}\\b`, 'm'), `lists ${c}`);
  t.match(top.stdout, /Exit codes: 0 done, 1 the operation failed, 2 cancelled, 64 usage error, 69 agent unreachable/);
  for (const c of COMMANDS) {
    const h = await runCli([c, '--help']);
    t.equal(h.code, 0, `${c} --help exits 0`);
    t.match(h.stdout, new RegExp(`^Usage: kvm-migrate ${c}`, 'm'), `${c} --help prints its usage, and does nothing else`);
  }
  const demoHelp = await runCli(['demo', '--help']);
  t.notMatch(demoHelp.stdout, /agents:|accelerator/, 'demo --help does not run the demo');
  const bare = await runCli([]);
  t.equal(bare.code, 64, 'no command: usage error');
  t.match(bare.stderr, /^Usage: kvm-migrate/m);
});

t.test('usage errors exit 64 and name the flag', async (t) => {
  const cases: Array<{ args: string[]; env?: Record<string, string>; says: RegExp }> = [
    { args: ['bogus'], says: /unknown command 'bogus'/ },
    { args: ['migrate', 'vm1', '--from', 'http://127.0.0.1:1'], says: /required option '--to <url>'/ },
    { args: ['migrate', 'vm1', '--from', 'http://127.0.0.1:1', '--to', 'http://127.0.0.1:2', '--bandwidth', 'fast'], says: /option '--bandwidth <MiB\/s>' argument 'fast' is invalid/ },
    { args: ['migrate', 'vm1', '--from', 'http://127.0.0.1:1', '--to', 'http://127.0.0.1:2', '--bandwith', '5'], says: /unknown option '--bandwith'/ },
    { args: ['migrate', 'vm1', '--from', 'http://127.0.0.1:1', '--to', 'http://127.0.0.1:2'], env: { KVM_MIGRATE_OFFLINE: 'maybe' }, says: /KVM_MIGRATE_OFFLINE \(for --offline\) must be/ },
    { args: ['resolve', 'j1', '--on', 'http://127.0.0.1:1', '--outcome', 'maybe', '--reason', 'x'], says: /option '--outcome <outcome>' argument 'maybe' is invalid. must be one of finished, aborted/ },
    { args: ['tune', 'j1', '--on', 'http://127.0.0.1:1', '--token', 't'], says: /give --bandwidth, --downtime or both/ },
    { args: ['tune', 'j1', '--on', 'http://127.0.0.1:1', '--bandwidth', '0'], says: /option '--bandwidth <MiB\/s>' argument '0' is invalid/ },
    { args: ['agent', '--listen', 'nowhere'], says: /--listen must be HOST:PORT/ },
    { args: ['agent', '--accel', 'xen'], says: /option '--accel <accel>' argument 'xen' is invalid/ },
    { args: ['agent'], env: { KVM_MIGRATE_MAX_INCOMING: 'many' }, says: /'--max-incoming <n>' value 'many' from env 'KVM_MIGRATE_MAX_INCOMING' is invalid/ },
    { args: ['agent', '--listen', '0.0.0.0:7199', '--token', 'x', '--state-dir', path.join(os.tmpdir(), 'kvm-migrate-test-never')], says: /set --migration-address/ },
    { args: ['jobs', '--on', 'http://127.0.0.1:1', '--token-file', '/nonexistent/token'], says: /--token-file \/nonexistent\/token: ENOENT/ },
    { args: ['jobs', '--on', 'http://127.0.0.1:1', '--token', 't', '--token-file', '/nonexistent/token'], says: /give --token or --token-file, not both/ },
  ];
  for (const c of cases) {
    const r = await runCli(c.args, c.env);
    t.equal(r.code, 64, `${c.args.join(' ')}: exit 64`);
    t.match(r.stderr, c.says, r.stderr.split('\n')[0]!);
  }
});

t.test('--token on the command line wins over KVM_MIGRATE_TOKEN_FILE', async (t) => {
  // The file does not exist: were it read, the command would fail with a usage error.
  const r = await runCli(['jobs', '--on', 'http://127.0.0.1:1', '--token', 't'], { KVM_MIGRATE_TOKEN_FILE: '/nonexistent/token' });
  t.equal(r.code, 69, 'the flag was used, the variable ignored');
});

t.test('an unreachable agent exits 69', async (t) => {
  for (const args of [['jobs', '--on', 'http://127.0.0.1:1'], ['migrate', 'vm1', '--from', 'http://127.0.0.1:1', '--to', 'http://127.0.0.1:2']]) {
    const r = await runCli(args);
    t.equal(r.code, 69, `${args[0]}: exit 69`);
    t.match(r.stderr, /cannot reach the agent at http:\/\/127\.0\.0\.1:1: ECONNREFUSED/);
  }
});

async function demoDirs(): Promise<string[]> {
  return (await readdir(os.tmpdir())).filter((e) => e.startsWith('kvm-migrate-demo-'));
}

t.test('the demo passes, and an interrupted demo ends everything it started', async (t) => {
  const before = await demoDirs();
  const full = await runCli(['demo']);
  t.equal(full.code, 0, `the demo passes: ${full.stdout.slice(-400)}`);
  t.match(full.stdout, /^accelerator (kvm|tcg)/m, 'says which accelerator and why');
  t.match(full.stdout, /demo passed: the guest moved there and back, kept running, never rebooted/);
  t.same(await demoDirs(), before, 'its directory is removed');

  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    const child = spawn(process.execPath, [path.join(packageRoot, 'dist', 'bin', 'kvm-migrate.js'), 'demo'], { stdio: ['ignore', 'pipe', 'pipe'] });
    t.teardown(() => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    });
    let out = '';
    child.stdout.setEncoding('utf8');
    const running = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the demo did not start its guest: ${out}`)), 60_000);
      child.stdout.on('data', (chunk: string) => {
        out += chunk;
        if (/demo-vm runs on hostA/.test(out)) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    await running;
    const dirs = (await demoDirs()).filter((d) => !before.includes(d));
    t.equal(dirs.length, 1, 'the demo has its directory');
    child.kill(signal);
    const code = await exited;
    t.equal(code, signal === 'SIGINT' ? 130 : 143, `${signal}: exit ${code}`);
    t.match(out, /demo interrupted/, 'says it was interrupted');
    t.same(processesMentioning(dirs[0]!), [], `${signal}: no qemu or agent of the demo is left`);
    t.same(await demoDirs(), before, `${signal}: its directory is removed`);
  }
});
