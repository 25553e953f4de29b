/** The real Linux test guest (src/guest/linux.ts) as the test files use it. */
import { once } from 'node:events';
import { copyFile } from 'node:fs/promises';
import { connect } from 'node:net';
import path from 'node:path';
import { ensureLinuxGuest, GuestPackagesUnavailableError, type LinuxGuest } from '../../src/guest/linux.js';

/**
 * Built (or found in the cache) once per file. Only missing packages skip (the reason is given
 * back); any other failure of the build fails the file.
 */
export async function linuxGuestOrSkip(): Promise<{ guest?: LinuxGuest; skip: string | false }> {
  try {
    return { guest: await ensureLinuxGuest(), skip: false };
  } catch (err) {
    if (!(err instanceof GuestPackagesUnavailableError)) throw err;
    return { skip: `the guest's Debian packages cannot be fetched: ${err.message}` };
  }
}

/** The guest's kernels (PVH, and the bzImage UEFI boots) and initrd copied into `dir` (below the agents' --allow-path). */
export async function copyLinuxGuest(guest: LinuxGuest, dir: string): Promise<{ kernel: string; efiKernel: string; initrd: string }> {
  const kernel = path.join(dir, 'vmlinux');
  const efiKernel = path.join(dir, 'vmlinuz');
  const initrd = path.join(dir, 'initrd.gz');
  await copyFile(guest.kernel, kernel);
  await copyFile(guest.efiKernel, efiKernel);
  await copyFile(guest.initrd, initrd);
  return { kernel, efiKernel, initrd };
}

/** Sends each command as a line on the guest agent's socket and reads as many reply lines. */
export async function guestAgentExchange(socketPath: string, commands: object[], timeoutMs = 10_000): Promise<unknown[]> {
  const sock = connect(socketPath);
  try {
    await once(sock, 'connect');
    sock.setEncoding('utf8');
    const replies: unknown[] = [];
    let buf = '';
    const done = new Promise<void>((resolve, reject) => {
      const fail = (err: Error) => {
        clearTimeout(timer);
        reject(err);
      };
      const timer = setTimeout(
        () => fail(new Error(`agent: ${replies.length} of ${commands.length} replies within ${timeoutMs} ms (${JSON.stringify(buf)})`)),
        timeoutMs,
      );
      sock.on('data', (chunk: string) => {
        buf += chunk;
        try {
          for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
            replies.push(JSON.parse(buf.slice(0, nl)));
            buf = buf.slice(nl + 1);
          }
        } catch (err) {
          fail(new Error(`agent: a reply is not JSON: ${JSON.stringify(buf)}`, { cause: err }));
        }
        if (replies.length >= commands.length) {
          clearTimeout(timer);
          resolve();
        }
      });
      sock.on('error', fail);
    });
    sock.write(commands.map((c) => JSON.stringify(c) + '\n').join(''));
    await done;
    return replies;
  } finally {
    sock.destroy();
  }
}
