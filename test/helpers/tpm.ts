/** A test guest with a TPM, and tpm2-tools on a stopped domain's TPM state. */
import { spawn, spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { testGuest, waitFor } from './agents.js';

export const TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>";
/** An owner NV index the tests write 8 bytes into. */
export const NV_INDEX = '0x1500016';

/** A tpm2-tools command line run against the TPM at hand; its stdout. */
export type TpmTool = (args: string[], input?: string) => string;

export async function tpmGuest(dir: string, name: string, tpm = TPM): Promise<{ xml: string; image: string }> {
  const guest = await testGuest(dir, name, undefined, { machine: 'q35' });
  return { xml: guest.xml.replace('</devices>', `${tpm}</devices>`), image: guest.image };
}

export function uidOf(pid: number): Promise<number> {
  return fs.readFile(`/proc/${pid}/status`, 'utf8').then((s) => Number(/^Uid:\s+(\d+)/m.exec(s)![1]));
}

/**
 * Runs tpm2-tools against a stopped domain's TPM state, on a swtpm of the test's own (with a
 * data socket, which the guest's swtpm does not have: qemu passes it its own).
 */
export async function withStateTpm<T>(stateDir: string, dir: string, fn: (tool: TpmTool) => T): Promise<T> {
  const sock = path.join(dir, 'tools-swtpm.sock');
  const swtpm = spawn('swtpm', ['socket', '--tpm2', '--tpmstate', `dir=${stateDir}`, '--server', `type=unixio,path=${sock}`, '--ctrl', `type=unixio,path=${sock}.ctrl`, '--flags', 'not-need-init,startup-clear'], { stdio: 'ignore' });
  const exited = new Promise((r) => swtpm.once('exit', r));
  const env = { ...process.env, TPM2TOOLS_TCTI: `swtpm:path=${sock}` };
  try {
    await waitFor('the tools swtpm', async () => fs.lstat(`${sock}.ctrl`).then(() => true, () => false), { timeoutMs: 10_000 });
    return fn((args, input) => {
      const r = spawnSync(args[0]!, args.slice(1), { encoding: 'utf8', env, ...(input !== undefined ? { input } : {}) });
      if (r.status !== 0) throw new Error(`${args.join(' ')}: ${r.stderr}`);
      return r.stdout;
    });
  } finally {
    // An orderly TPM shutdown, so swtpm writes its state before it goes.
    spawnSync('tpm2_shutdown', [], { env });
    swtpm.kill('SIGTERM');
    await exited;
  }
}

/** Defines NV_INDEX and writes its 8 bytes. */
export function nvWrite(tool: TpmTool, value: string): void {
  tool(['tpm2_nvdefine', NV_INDEX, '-C', 'o', '-s', String(value.length), '-a', 'ownerread|ownerwrite']);
  tool(['tpm2_nvwrite', NV_INDEX, '-C', 'o', '-i', '-'], value);
}
