/**
 * The taps of bridged guests (interface type bridge, and type network through --network). qemu
 * cannot make them itself: it runs as a user of its own, under a seccomp filter that forbids
 * spawning qemu-bridge-helper. So the agent creates each tap persistent and owned by that qemu's
 * user (who may then attach to it through /dev/net/tun, with `ifname=`), puts it on its bridge,
 * and deletes it when the qemu has ended. Only a tap it created (and recorded) is ever deleted,
 * and only while it is still the tun device of the user recorded with it.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { execa } from 'execa';

export interface TapRecord {
  name: string;
  /** The user the tap belongs to (qemu's). */
  uid: number;
  bridge: string;
  /** The interface's `<mtu size>`; else the kernel's default. */
  mtu?: number;
}

const IP_TIMEOUT_MS = 10_000;

async function ip(args: string[]): Promise<string> {
  const r = await execa('ip', args, { reject: false, timeout: IP_TIMEOUT_MS });
  if (r.exitCode !== 0) throw new Error(`ip ${args.join(' ')}: ${(r.stderr || r.stdout || r.shortMessage || "").trim()}`);
  return r.stdout;
}

/** A Linux bridge of this network namespace. */
export function bridgeExists(name: string): boolean {
  return fs.existsSync(`/sys/class/net/${name}/bridge`);
}

/** A free name for a tap of the agent's (kmv + 10 hex digits: 13 of IFNAMSIZ's 15). */
export function newTapName(): string {
  for (let i = 0; i < 16; i++) {
    const name = `kmv${randomBytes(5).toString('hex')}`;
    if (!fs.existsSync(`/sys/class/net/${name}`)) return name;
  }
  throw new Error('no free tap name found');
}

/**
 * Creates the tap for `uid` and attaches it to the bridge, up. A name already in use fails
 * (TUNSETIFF: busy), so nothing that exists is taken over; a tap half made is removed again.
 */
export async function createTap(rec: TapRecord): Promise<void> {
  await ip(['tuntap', 'add', 'dev', rec.name, 'mode', 'tap', 'user', String(rec.uid), 'vnet_hdr']);
  try {
    await ip(['link', 'set', 'dev', rec.name, 'master', rec.bridge, ...(rec.mtu !== undefined ? ['mtu', String(rec.mtu)] : []), 'up']);
  } catch (err) {
    await deleteTap(rec).catch(() => undefined);
    throw err;
  }
}

/** What the kernel says about a tap: its owner, or null when there is no tun device of that name. */
async function tapOwner(name: string): Promise<number | string | null | undefined> {
  const r = await execa('ip', ['-d', '-j', 'link', 'show', 'dev', name], { reject: false, timeout: IP_TIMEOUT_MS });
  if (r.exitCode !== 0) return null;
  const [link] = JSON.parse(r.stdout) as Array<{ linkinfo?: { info_kind?: string; info_data?: { type?: string; user?: number | string } } }>;
  const info = link?.linkinfo;
  if (info?.info_kind !== 'tun' || info.info_data?.type !== 'tap') return null;
  return info.info_data.user;
}

async function uidOf(user: number | string): Promise<number | undefined> {
  if (typeof user === 'number') return user;
  if (/^\d+$/.test(user)) return Number(user);
  const r = await execa('getent', ['passwd', user], { reject: false, timeout: IP_TIMEOUT_MS });
  const uid = Number(r.stdout.split(':')[2]);
  return r.exitCode === 0 && Number.isInteger(uid) ? uid : undefined;
}

/**
 * Deletes a tap this agent made: 'deleted', 'gone' (no such tap any more) or 'not-ours' (a tap
 * of that name belongs to someone else now, and is left alone).
 */
export async function deleteTap(rec: TapRecord): Promise<'deleted' | 'gone' | 'not-ours'> {
  const owner = await tapOwner(rec.name);
  if (owner === null) return 'gone';
  if (owner === undefined || (await uidOf(owner)) !== rec.uid) return 'not-ours';
  await ip(['link', 'del', 'dev', rec.name]);
  return 'deleted';
}

export function isTapRecord(v: unknown): v is TapRecord {
  const r = v as TapRecord;
  return typeof r === 'object' && r !== null && typeof r.name === 'string' && /^[A-Za-z0-9_.:-]{1,15}$/.test(r.name) && Number.isInteger(r.uid) && typeof r.bridge === 'string';
}

/** Whether a process of `uid`/`gid` may open /dev/net/tun read-write (permission bits). */
export function tunUsableBy(uid: number, gid: number): boolean {
  try {
    const st = fs.statSync('/dev/net/tun');
    if (uid === 0) return true;
    if (st.uid === uid) return (st.mode & 0o600) === 0o600;
    if (st.gid === gid) return (st.mode & 0o060) === 0o060;
    return (st.mode & 0o006) === 0o006;
  } catch {
    return false;
  }
}
