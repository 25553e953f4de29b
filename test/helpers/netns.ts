import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import type { TestContext } from './agents.js';

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/**
 * Two test hosts in network namespaces of their own, joined by a veth pair (the "wire", which a
 * test can cut), plus one control veth from this namespace into each, so the test keeps talking
 * to both agents while the wire is down. Addresses exist only inside these namespaces.
 *   wire:    A 10.77.N.1  <->  B 10.77.N.2
 *   control: this 10.78.N.1 <-> A 10.78.N.2,   this 10.78.N.5 <-> B 10.78.N.6
 * N differs per rig, so a rig left by a killed run cannot capture another rig's traffic.
 */
export interface TwoHostRig {
  nsA: string;
  nsB: string;
  wireA: string;
  wireB: string;
  controlA: string;
  controlB: string;
  cut(): void;
  restore(): void;
}

export function canMakeNamespaces(): boolean {
  const probe = `kmt${randomBytes(3).toString('hex')}`;
  try {
    ip('netns', 'add', probe);
    ip('netns', 'del', probe);
    return true;
  } catch {
    return false;
  }
}

export function makeTwoHostRig(t: TestContext): TwoHostRig {
  const bytes = randomBytes(2);
  const id = bytes.toString('hex');
  const n = 1 + (bytes[0]! % 250);
  const nsA = `kmt${id}a`;
  const nsB = `kmt${id}b`;
  const made: string[] = [];
  t.teardown(() => {
    for (const ns of made.reverse()) {
      try {
        ip('netns', 'del', ns); // removes the veths inside it and so their peers
      } catch {
        // already gone
      }
    }
  });
  for (const ns of [nsA, nsB]) {
    ip('netns', 'add', ns);
    made.push(ns);
    ip('-n', ns, 'link', 'set', 'lo', 'up');
  }
  const wire = [`kmt${id}w0`, `kmt${id}w1`];
  ip('link', 'add', wire[0]!, 'type', 'veth', 'peer', 'name', wire[1]!);
  ip('link', 'set', wire[0]!, 'netns', nsA);
  ip('link', 'set', wire[1]!, 'netns', nsB);
  ip('-n', nsA, 'addr', 'add', `10.77.${n}.1/24`, 'dev', wire[0]!);
  ip('-n', nsB, 'addr', 'add', `10.77.${n}.2/24`, 'dev', wire[1]!);
  ip('-n', nsA, 'link', 'set', wire[0]!, 'up');
  ip('-n', nsB, 'link', 'set', wire[1]!, 'up');
  for (const [ns, root, inner, rootAddr, innerAddr] of [
    [nsA, `kmt${id}ca`, `kmt${id}ia`, `10.78.${n}.1/30`, `10.78.${n}.2/30`],
    [nsB, `kmt${id}cb`, `kmt${id}ib`, `10.78.${n}.5/30`, `10.78.${n}.6/30`],
  ] as const) {
    ip('link', 'add', root, 'type', 'veth', 'peer', 'name', inner);
    ip('link', 'set', inner, 'netns', ns);
    ip('addr', 'add', rootAddr, 'dev', root);
    ip('-n', ns, 'addr', 'add', innerAddr, 'dev', inner);
    ip('link', 'set', root, 'up');
    ip('-n', ns, 'link', 'set', inner, 'up');
  }
  return {
    nsA,
    nsB,
    wireA: `10.77.${n}.1`,
    wireB: `10.77.${n}.2`,
    controlA: `10.78.${n}.2`,
    controlB: `10.78.${n}.6`,
    cut: () => ip('-n', nsA, 'link', 'set', wire[0]!, 'down'),
    restore: () => ip('-n', nsA, 'link', 'set', wire[0]!, 'up'),
  };
}
