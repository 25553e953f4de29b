/** Shared by the qemu tests: temp dirs, minimal guests, and killing by PID whatever a file started. */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Test } from 'tap';
import { launchQemu, processMatches, waitForExit, type QemuLaunch, type QemuProcessRecord } from '../../src/qemu/process.js';
import type { QmpClient } from '../../src/qemu/qmp.js';

export const QEMU = 'qemu-system-x86_64';

// The suite-wide leftover check (test/zz-leftovers.test.ts) looks for this prefix.
const TMP_PREFIX = 'kvm-migrate-test-qemu-';

export async function tmpDir(t: Test): Promise<string> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), TMP_PREFIX));
  t.teardown(() => fsp.rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A guest that needs no disk: paused (-S) in SeaBIOS, TCG so it runs anywhere. */
export function minimalArgv(): string[] {
  return ['-S', '-nodefaults', '-display', 'none', '-machine', 'pc,accel=tcg', '-m', '64'];
}

/** The brief's full form: the argv already carries the pidfile and the QMP monitor. */
export function fullArgv(dir: string): string[] {
  return [
    ...minimalArgv(),
    '-pidfile', path.join(dir, 'qemu.pid'),
    '-chardev', `socket,id=charmonitor,path=${path.join(dir, 'qmp.sock')},server=on,wait=off`,
    '-mon', 'chardev=charmonitor,id=monitor,mode=control',
  ];
}

export function launchSpec(dir: string, argv = fullArgv(dir)): QemuLaunch {
  return {
    binary: QEMU,
    argv,
    logPath: path.join(dir, 'qemu.log'),
    pidfilePath: path.join(dir, 'qemu.pid'),
    qmpSocketPath: path.join(dir, 'qmp.sock'),
    startTimeoutMs: 15_000,
  };
}

/**
 * Remembers every qemu a test file starts, SIGKILLs each (by PID) in the teardown of the test
 * that started it, and lets the file check at its end that none is left.
 */
export class GuestTracker {
  readonly records: QemuProcessRecord[] = [];

  track(t: Test, rec: QemuProcessRecord, qmp?: QmpClient): void {
    this.records.push(rec);
    t.teardown(async () => {
      await qmp?.close();
      if (processMatches(rec)) process.kill(rec.pid, 'SIGKILL');
      await waitForExit(rec, 5000);
    });
  }

  async launch(t: Test, spec: QemuLaunch): Promise<{ record: QemuProcessRecord; qmp: QmpClient }> {
    const started = await launchQemu(spec);
    this.track(t, started.record, started.qmp);
    return started;
  }

  /** Registers the file's final check; call once, after every other test of the file. */
  checkNoneLeft(t: Test): void {
    t.test('no qemu started by this file is still alive', async (t) => {
      t.ok(this.records.length > 0, 'the file started qemus');
      t.same(this.records.filter(processMatches).map((r) => r.pid), []);
    });
  }
}

/** Pids of live processes whose command line mentions `needle` (e.g. a test's temp dir). */
export function processesMentioning(needle: string): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) continue;
      if (fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').includes(needle)) pids.push(Number(entry));
    } catch {
      // exited while we looked
    }
  }
  return pids;
}

/** pgrp and session of a process: /proc/<pid>/stat fields 5 and 6. */
export function procGroupAndSession(pid: number): { pgrp: number; session: number } {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { pgrp: Number(fields[2]), session: Number(fields[3]) };
}

/** The rejection of `p` (fails the caller's expectations if it resolves). */
export async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection, but the promise resolved');
}
