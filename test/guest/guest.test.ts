// Tests for the test guest itself (boot.S / boot.bin / image.ts): boots it
// under plain qemu (TCG) and checks what the migration tests rely on.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import t from 'tap';
import {
  GUEST_FILL_BASE,
  GUEST_IMAGE_SIZE,
  GUEST_MAGIC,
  GUEST_PARAM_MAGIC_OFFSET,
  GUEST_PARAM_OFFSET,
  GUEST_STATE_RUNNING,
  bootBinPath,
  expectedRegionDigest,
  guestHotWord,
  guestMemoryMiB,
  guestPatternWord,
  guestSourceDir,
  guestStaticRegion,
  parseSerialLog,
  parseXpWords,
  ramDigest,
  readGuestCounters,
  readGuestStatus,
  readGuestWords,
  writeGuestImage,
  type GuestParams,
} from '../../src/guest/image.js';

const QEMU = 'qemu-system-x86_64';
const MiB = 1024 * 1024;
const hex8 = (n: number): string => n.toString(16).padStart(8, '0');

const has = (cmd: string, arg = '--version'): boolean => !spawnSync(cmd, [arg], { stdio: 'ignore' }).error;
const noBinutils = has('as') && has('ld') ? false : 'GNU as/ld (binutils) not installed';
const noQemu = has(QEMU) ? false : `${QEMU} not installed`;

// ---- minimal QMP client (raw socket, one command in flight) -------------------

class MiniQmp {
  private buf = '';
  private queue: Record<string, unknown>[] = [];
  private waiter: ((msg: Record<string, unknown> | Error) => void) | null = null;
  private closed: Error | null = null;

  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      this.buf += chunk;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as Record<string, unknown>;
        if ('event' in msg) continue;
        this.deliver(msg);
      }
    });
    const fail = (e?: Error) => this.deliver((this.closed ??= e ?? new Error('QMP socket closed')));
    sock.on('error', fail);
    sock.on('close', () => fail());
  }

  private deliver(msg: Record<string, unknown> | Error): void {
    const w = this.waiter;
    if (w) {
      this.waiter = null;
      w(msg);
    } else if (!(msg instanceof Error)) this.queue.push(msg);
  }

  private next(): Promise<Record<string, unknown>> {
    const queued = this.queue.shift();
    if (queued) return Promise.resolve(queued);
    if (this.closed) return Promise.reject(this.closed);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(new Error('QMP reply timeout'));
      }, 30_000);
      this.waiter = (msg) => {
        clearTimeout(timer);
        if (msg instanceof Error) reject(msg);
        else resolve(msg);
      };
    });
  }

  static async connect(path: string, deadlineMs: number): Promise<MiniQmp> {
    for (;;) {
      try {
        const sock = connect(path);
        await once(sock, 'connect');
        const qmp = new MiniQmp(sock);
        await qmp.next(); // greeting
        await qmp.exec('qmp_capabilities');
        return qmp;
      } catch (e) {
        if (Date.now() > deadlineMs) throw e;
        await sleep(20);
      }
    }
  }

  async exec(cmd: string, args?: object): Promise<unknown> {
    this.sock.write(JSON.stringify(args ? { execute: cmd, arguments: args } : { execute: cmd }) + '\n');
    const r = await this.next();
    if ('error' in r) throw new Error(`QMP ${cmd}: ${JSON.stringify(r.error)}`);
    return r.return;
  }

  async hmp(commandLine: string): Promise<string> {
    return (await this.exec('human-monitor-command', { 'command-line': commandLine })) as string;
  }

  close(): void {
    this.sock.destroy();
  }
}

// ---- running a guest -------------------------------------------------------------

interface Guest {
  dir: string;
  logPath: string;
  proc: ChildProcess;
  qmp: MiniQmp;
  spawnedAt: number;
  stderr: () => string;
  log: () => Promise<string>;
}

async function startGuest(
  tt: { teardown(fn: () => unknown): void },
  params: GuestParams,
  opts: { disk: 'ide' | 'virtio'; noReboot: boolean },
): Promise<Guest> {
  const dir = await mkdtemp(join(tmpdir(), 'kmgt-guest-'));
  let proc: ChildProcess | undefined;
  let qmp: MiniQmp | undefined;
  tt.teardown(async () => {
    qmp?.close();
    if (proc?.pid !== undefined && proc.exitCode === null && proc.signalCode === null) {
      const exited = once(proc, 'exit');
      process.kill(proc.pid, 'SIGKILL');
      await exited;
    }
    await rm(dir, { recursive: true, force: true });
  });

  const image = join(dir, 'disk.img');
  const logPath = join(dir, 'serial.log');
  const sock = join(dir, 'qmp.sock');
  await writeGuestImage(image, params);
  const dev =
    opts.disk === 'ide' ? 'ide-hd,drive=d0,bootindex=1' : 'virtio-blk-pci,drive=d0,bootindex=1';
  const args = [
    '-machine', 'pc,accel=tcg',
    '-m', String(Math.max(64, guestMemoryMiB(params))),
    '-nodefaults', '-display', 'none',
    '-drive', `file=${image},format=raw,if=none,id=d0`,
    '-device', dev,
    '-chardev', `file,id=s0,path=${logPath}`,
    '-device', 'isa-serial,chardev=s0',
    '-qmp', `unix:${sock},server=on,wait=off`,
    ...(opts.noReboot ? ['-no-reboot'] : []),
  ];
  const spawnedAt = Date.now();
  const p = spawn(QEMU, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  proc = p;
  let stderr = '';
  p.stderr?.setEncoding('utf8');
  p.stderr?.on('data', (s: string) => (stderr += s));
  p.on('error', (e) => (stderr += String(e)));
  qmp = await MiniQmp.connect(sock, Date.now() + 15_000).catch((e: unknown) => {
    throw new Error(`QMP connect failed: ${String(e)}; qemu stderr: ${stderr}`);
  });
  const log = () => readFile(logPath, 'latin1').catch(() => '');
  return { dir, logPath, proc: p, qmp, spawnedAt, stderr: () => stderr, log };
}

/** Poll fn until it returns a non-undefined value; fail if qemu exited or time ran out. */
async function waitFor<T>(g: Guest, what: string, fn: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (g.proc.exitCode !== null || g.proc.signalCode !== null) {
      throw new Error(`qemu exited (${g.proc.exitCode ?? g.proc.signalCode}) while waiting for ${what}: ${g.stderr()}`);
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; serial: ${await g.log()}`);
    await sleep(5);
  }
}

// ---- tests -------------------------------------------------------------------------

t.test('boot.bin in the repo is exactly what boot.S assembles to', { skip: noBinutils }, async (tt) => {
  const dir = await mkdtemp(join(tmpdir(), 'kmgt-asm-'));
  tt.teardown(() => rm(dir, { recursive: true, force: true }));
  const out = join(dir, 'boot.bin');
  const r = spawnSync('bash', [join(guestSourceDir(), 'build.sh'), out], { encoding: 'utf8' });
  tt.equal(r.status, 0, `build.sh succeeds ${r.stderr}`);
  const [built, committed] = await Promise.all([readFile(out), readFile(bootBinPath())]);
  tt.equal(built.length, 512);
  tt.ok(built.equals(committed), 'boot.bin is up to date (run src/guest/build.sh)');
});

t.test('writeGuestImage patches the parameter block and pads to 1 MiB', async (tt) => {
  const dir = await mkdtemp(join(tmpdir(), 'kmgt-img-'));
  tt.teardown(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'disk.img');
  await writeGuestImage(path, { fillMiB: 48, hotMiB: 8, reportEvery: 1000 });
  tt.equal((await stat(path)).size, GUEST_IMAGE_SIZE);
  const img = await readFile(path);
  const orig = await readFile(bootBinPath());
  tt.equal(img.toString('latin1', GUEST_PARAM_MAGIC_OFFSET, GUEST_PARAM_MAGIC_OFFSET + 4), 'KPRM');
  tt.same(
    [0, 4, 8].map((o) => img.readUInt32LE(GUEST_PARAM_OFFSET + o)),
    [48, 8, 1000],
  );
  tt.same([img[510], img[511]], [0x55, 0xaa]);
  tt.ok(img.subarray(0, GUEST_PARAM_OFFSET).equals(orig.subarray(0, GUEST_PARAM_OFFSET)), 'code untouched');
  tt.ok(img.subarray(512).every((b) => b === 0), 'padding is zero');

  for (const bad of [
    { fillMiB: 4, hotMiB: 8, reportEvery: 1 },
    { fillMiB: -1, hotMiB: 0, reportEvery: 1 },
    { fillMiB: 1.5, hotMiB: 0, reportEvery: 1 },
    { fillMiB: 5000, hotMiB: 0, reportEvery: 1 },
    { fillMiB: 1, hotMiB: 0, reportEvery: 2 ** 32 },
  ]) {
    await tt.rejects(writeGuestImage(join(dir, 'bad.img'), bad), RangeError, JSON.stringify(bad));
  }
});

t.test('parsers', async (tt) => {
  const log =
    'SeaBIOS junk\r\nKMGT boot 06F6825f\r\nKMGT pass 00000100\r\nKMGT pass 00000200\r\n' +
    'KMGT boot 1234abcd\r\nKMGT pass 00000064\r\nKMGT pass 0000';
  tt.same(parseSerialLog(log), { boots: ['06f6825f', '1234abcd'], lastPass: 0x64, passes: [0x100, 0x200, 0x64] });
  tt.same(parseSerialLog(''), { boots: [], lastPass: null, passes: [] });
  tt.same(parseSerialLog('KMGT pass 0000002a\n'), { boots: [], lastPass: 42, passes: [42] });

  const xp = '0000000000009000: 0x4b4d4754 0xe0c1ece5 0x00000010\r\n';
  tt.same(parseXpWords(xp), [GUEST_MAGIC, 0xe0c1ece5, 16]);
  const fake = { hmp: async (c: string) => (c === 'xp /3wx 0x9000' ? xp : '') };
  tt.same(await readGuestCounters(fake), { magic: GUEST_MAGIC, bootId: 0xe0c1ece5, passes: 16 });
  await tt.rejects(readGuestCounters({ hmp: async () => 'Cannot access memory\r\n' }));

  // the TS model of the pattern matches what the guest writes (never zero, low bits set)
  tt.equal(guestPatternWord(0x200000), (Math.imul(0x200000, 0x9e3779b1) ^ 0xdeadbeef) >>> 0);
  tt.equal(guestHotWord(0x200000, 3) ^ guestPatternWord(0x200000), 12);
  const d = expectedRegionDigest(0x300000, 8);
  const b = Buffer.alloc(8);
  b.writeUInt32LE(guestPatternWord(0x300000), 0);
  b.writeUInt32LE(guestPatternWord(0x300004), 4);
  const { createHash } = await import('node:crypto');
  tt.equal(d, createHash('sha256').update(b).digest('hex'));
});

t.test('guest boots from IDE under TCG, fills RAM and keeps dirtying the hot set', { skip: noQemu }, async (tt) => {
  const params: GuestParams = { fillMiB: 32, hotMiB: 4, reportEvery: 500 };
  const g = await startGuest(tt, params, { disk: 'ide', noReboot: true });

  const bootLine = await waitFor(g, 'boot line', async () => parseSerialLog(await g.log()).boots[0], 10_000);
  const bootMs = Date.now() - g.spawnedAt;
  tt.comment(`boot line after ${bootMs} ms (qemu spawn -> "KMGT boot")`);

  const filledAt = Date.now();
  const st = await waitFor(g, 'fill done', async () => {
    const s = await readGuestStatus(g.qmp);
    return s.state === GUEST_STATE_RUNNING ? s : undefined;
  });
  tt.comment(`fill of ${params.fillMiB} MiB done within ${Date.now() - filledAt} ms of the boot line`);
  tt.equal(st.magic, GUEST_MAGIC, 'magic');
  tt.not(st.bootId, 0, 'boot id set');
  tt.equal(hex8(st.bootId), bootLine, 'boot id in RAM matches the serial boot line');
  tt.same(st.params, params, 'parameters echoed at 0x9010');

  const c1 = await readGuestCounters(g.qmp);
  const t1 = Date.now();
  await sleep(500);
  const c2 = await readGuestCounters(g.qmp);
  const rate = ((c2.passes - c1.passes) * 1000) / (Date.now() - t1);
  tt.comment(`hot set ${params.hotMiB} MiB: ${rate.toFixed(0)} passes/s (${((rate * params.hotMiB) | 0)} MiB/s dirtied)`);
  tt.ok(c2.passes > c1.passes, `pass counter grows (${c1.passes} -> ${c2.passes})`);
  tt.equal(c2.bootId, c1.bootId, 'boot id stable');
  tt.equal(c2.magic, GUEST_MAGIC);

  // static part of the fill: exact pattern; just past the fill: untouched (zero)
  const stat_ = guestStaticRegion(params);
  for (const a of [stat_.addr, stat_.addr + 0x1234 * 4, stat_.addr + stat_.size - 4]) {
    tt.same(await readGuestWords(g.qmp, a, 1), [guestPatternWord(a)], `fill pattern at 0x${a.toString(16)}`);
  }
  const end = GUEST_FILL_BASE + params.fillMiB * MiB;
  tt.same(await readGuestWords(g.qmp, end, 1), [0], 'nothing written past fillMiB');

  // hot set: rewritten words carry a recent pass number, the rest keeps the pattern
  const hotAddr = GUEST_FILL_BASE + 0x1000 * 77;
  const [w0, w1] = await readGuestWords(g.qmp, hotAddr, 2);
  const now = (await readGuestCounters(g.qmp)).passes;
  const pass = ((w0! ^ guestPatternWord(hotAddr)) >>> 2) >>> 0;
  tt.ok(pass >= c2.passes && pass <= now + 1, `hot word carries a recent pass (${pass}, counter ${now})`);
  tt.equal(w1, guestPatternWord(hotAddr + 4), 'non-rewritten hot-set word keeps the fill pattern');

  // whole static region via pmemsave == the pattern computed here
  const digest = await ramDigest((c, a) => g.qmp.exec(c, a), stat_.size, g.dir, stat_.addr);
  tt.equal(digest, expectedRegionDigest(stat_.addr, stat_.size), 'static region digest (pmemsave) matches');

  const passes = await waitFor(g, 'two pass lines', async () => {
    const s = parseSerialLog(await g.log());
    return s.passes.length >= 2 ? s : undefined;
  });
  tt.same(passes.boots, [bootLine], 'exactly one boot');
  tt.ok(passes.passes.every((p, i) => i === 0 || p > passes.passes[i - 1]!), 'serial passes increase');
  tt.ok(passes.passes.every((p) => p % params.reportEvery === 0), 'reported every reportEvery passes');
});

t.test('hotMiB=0 from virtio-blk: slow calibrated passes; a reset is visible', { skip: noQemu }, async (tt) => {
  const params: GuestParams = { fillMiB: 1, hotMiB: 0, reportEvery: 100 };
  const g = await startGuest(tt, params, { disk: 'virtio', noReboot: false });
  const boot1 = await waitFor(g, 'boot line', async () => parseSerialLog(await g.log()).boots[0], 10_000);
  tt.comment(`boot line after ${Date.now() - g.spawnedAt} ms (virtio-blk)`);
  await waitFor(g, 'first pass', async () => ((await readGuestCounters(g.qmp)).passes > 0 ? true : undefined));

  const c1 = await readGuestCounters(g.qmp);
  const t1 = Date.now();
  await sleep(1000);
  const c2 = await readGuestCounters(g.qmp);
  const rate = ((c2.passes - c1.passes) * 1000) / (Date.now() - t1);
  tt.comment(`idle passes: ${rate.toFixed(0)} passes/s`);
  tt.ok(c2.passes > c1.passes, 'counter grows');
  tt.ok(rate < 20_000, `idle passes are throttled (${rate.toFixed(0)}/s)`);
  tt.equal(hex8(c1.bootId), boot1);

  // negative control for "did not reboot": a reset gives a new boot id and boot line
  await g.qmp.exec('system_reset');
  const boots = await waitFor(g, 'second boot line', async () => {
    const b = parseSerialLog(await g.log()).boots;
    return b.length >= 2 ? b : undefined;
  });
  tt.equal(boots.length, 2);
  tt.not(boots[1], boots[0], 'new boot id after reset');
  const c3 = await waitFor(g, 'counters after reset', async () => {
    const c = await readGuestCounters(g.qmp);
    return hex8(c.bootId) === boots[1] ? c : undefined;
  });
  tt.ok(c3.passes < c2.passes, `pass counter restarted (${c3.passes} < ${c2.passes})`);
});
