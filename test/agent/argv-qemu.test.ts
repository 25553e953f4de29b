/**
 * qemu 7.2 accepts the argv of the golden fixtures of libvirt's elements (NUMA cells, file-backed
 * RAM as with hugepages, itco, smbios, watchdogs, timers, the Hyper-V set, SPICE's settings with a virtio-vga and a second qxl): each is started with -S on TCG, with
 * its host files replaced by scratch ones, and must still be running after a moment; it is then
 * ended by its PID. The RAM is made small and the hugepages directory is an ordinary one
 * (qemu's memory-backend-file takes any directory), so no huge pages are needed.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildArgv, normalizeDomainXml } from '../../src/domain/index.js';
import { loadFirmwareDescriptors } from '../../src/qemu/firmware.js';
import { tmpDir } from '../helpers/agents.js';

const FIXTURES = new URL('../../../test/domain/fixtures/', import.meta.url);

async function scratchXml(name: string, dir: string): Promise<string> {
  let xml = await fs.readFile(new URL(`${name}.xml`, FIXTURES), 'utf8');
  const files = new Map<string, string>();
  xml = xml.replace(/file=(['"])([^'"]*)\1/g, (_m, _q: string, p: string) => {
    if (!files.has(p)) files.set(p, path.join(dir, `f${files.size}`));
    return `file='${files.get(p)}'`;
  });
  for (const f of files.values()) await fs.writeFile(f, Buffer.alloc(1 << 20));
  return xml
    .replace(/type=(['"])qcow2\1/g, "type='raw'")
    // TCG has no VP index for Hyper-V (qemu: "kernel doesn't allow setting HyperV VP_INDEX"); KVM has.
    .replace(/<vpindex state="on"\/>/, '<vpindex state="off"/>')
    .replace(/<interface type='(bridge|ethernet)'>/g, "<interface type='user'>")
    .replace(/<source bridge='[^']*'\/>|<target dev='tap[^']*'\/>/g, '')
    .replace(/<memory unit='KiB'>\d+<\/memory>\s*<currentMemory unit='KiB'>\d+<\/currentMemory>/, (m) => (/<numa>/.test(xml) ? "<memory unit='MiB'>256</memory>" : m))
    .replace(/(<cell id='\d' cpus='[^']*') memory='[^']*' unit='[^']*'/g, "$1 memory='128' unit='MiB'");
}

for (const name of ['dumpxml-q35-server', 'nova-pc-sysinfo', 'numa-hugepages-iothreads', 'virt-manager-windows-hyperv', 'spice-pc-two-heads']) {
  t.test(name, async (t) => {
    const dir = await tmpDir(t);
    const { def } = normalizeDomainXml(await scratchXml(name, dir), {
      machineAliases: { pc: 'pc-i440fx-7.2', q35: 'pc-q35-7.2' },
      knownMachines: ['pc-i440fx-7.2', 'pc-q35-7.2'],
      firmwares: (await loadFirmwareDescriptors()).descriptors,
      randomBytes: (n) => Buffer.alloc(n, 7),
    });
    const argv = buildArgv(def, { qemuBinary: 'qemu-system-x86_64', accel: 'tcg', qmpSocketPath: path.join(dir, 'qmp'), pidfilePath: path.join(dir, 'pid'), hugepagesPath: dir });
    const child = spawn('qemu-system-x86_64', argv, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    t.teardown(() => {
      if (child.exitCode === null && child.pid) process.kill(child.pid, 'SIGKILL');
    });
    const early = await Promise.race([exited, sleep(1500).then(() => 'running' as const)]);
    t.equal(early, 'running', `qemu accepted the argv${early === 'running' ? '' : `: ${stderr}`}`);
    process.kill(child.pid!, 'SIGTERM');
    await exited;
  });
}
