import { pickPort } from '../migration/ports.js';

/** libvirt's range for the ports of displays (qemu.conf remote_display_port_min/max). */
const DISPLAY_PORTS = { low: 5900, high: 65535 };

/**
 * The ports of autoport SPICE displays (qemu needs an explicit one, unlike VNC's `to=`): the
 * lowest of 5900 up that no other guest of this agent holds and nobody has bound on the
 * display's address, as libvirt chooses. Each is held by its domain while its qemu runs, so
 * two launches never choose the same one, also before the first qemu has bound it.
 */
export class DisplayPorts {
  private readonly byDomain = new Map<string, number>();
  /** Every port held, including a launch's candidate while it is being probed. */
  private readonly held = new Set<number>();

  async acquire(domain: string, address: string): Promise<number | null> {
    this.release(domain);
    const port = await pickPort(address, DISPLAY_PORTS, this.held, (candidate) => this.hold(domain, candidate));
    if (port === null) this.release(domain);
    return port;
  }

  /** Also for a guest found running after a restart (its port as qemu reports it). */
  hold(domain: string, port: number): void {
    const previous = this.byDomain.get(domain);
    if (previous !== undefined) this.held.delete(previous);
    this.byDomain.set(domain, port);
    this.held.add(port);
  }

  release(domain: string): void {
    const port = this.byDomain.get(domain);
    if (port === undefined) return;
    this.held.delete(port);
    this.byDomain.delete(domain);
  }
}
