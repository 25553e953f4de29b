/**
 * qemu's migration connections as the kernel sees them (iproute2's ss). qemu itself never
 * notices a peer host that vanished without a FIN or RST: it waits on the socket for ever.
 * The destination reads how much of an incoming stream has arrived (its sign of life); the
 * source resets the connections of a cancelled stream its peer no longer takes.
 */
import { execa } from 'execa';

const SS_TIMEOUT_MS = 5000;

/** The address in a stream URI (tcp:HOST:PORT, HOST bracketed when IPv6). */
export function streamAddressOf(uri: string): { host: string; port: number } {
  const colon = uri.lastIndexOf(':');
  return { host: uri.slice('tcp:'.length, colon).replace(/^\[|\]$/g, ''), port: Number(uri.slice(colon + 1)) };
}

function socketAddress(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

/**
 * Resets (SOCK_DESTROY) the established connections to host:port, the destination's listener
 * of this migration: qemu's writes on them fail at once. What ends a cancelled stream whose
 * peer takes no bytes (a frozen host): qemu 7.2 cancels a multifd stream only once its
 * channels' blocked writes return, which on a live but silent connection is never.
 */
export async function resetOutgoingStream(host: string, port: number): Promise<void> {
  await execa('ss', ['-K', 'state', 'established', 'dst', socketAddress(host, port)], { timeout: SS_TIMEOUT_MS });
}

/**
 * Bytes received so far on the established TCP connections whose local end is host:port (qemu's
 * incoming listener); undefined when there is none.
 */
export async function incomingStreamBytes(host: string, port: number): Promise<number | undefined> {
  const local = socketAddress(host, port);
  const { stdout } = await execa('ss', ['-tinH', 'state', 'established', 'src', local], { timeout: SS_TIMEOUT_MS });
  const counts = [...stdout.matchAll(/\bbytes_received:(\d+)/g)].map((m) => Number(m[1]));
  return counts.length === 0 ? undefined : counts.reduce((a, b) => a + b, 0);
}
