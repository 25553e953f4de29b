/**
 * How a receiving qemu gets userfaultfd (src/qemu/userfaultfd.ts): what the agent finds on this
 * host, and, on real qemu 7.2 run as an unprivileged user, that the grant (/dev/userfaultfd
 * handed over, with the preload) is what lets it take postcopy where the kernel's sysctl is 0.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import t from 'tap';
import { DEFAULT_QEMU_UIDS } from '../../src/agent/qemu-user.js';
import { openUserfaultfdDevice, USERFAULTFD_DEVICE, USERFAULTFD_PRELOAD, userfaultfdAccess } from '../../src/qemu/userfaultfd.js';
import { GuestTracker, launchSpec, minimalArgv, tmpDir } from './helpers.js';

const guests = new GuestTracker();
const sysctlAllows = fs.readFileSync('/proc/sys/vm/unprivileged_userfaultfd', 'utf8').trim() === '1';
const isRoot = process.getuid?.() === 0;
/** No account uses the agent's dynamic range. */
const QEMU_USER = { uid: DEFAULT_QEMU_UIDS.first + 4242, gid: DEFAULT_QEMU_UIDS.first + 4242 };

t.test('what the agent finds: refused by --no-postcopy, root qemu, the sysctl, else the device with the preload, else why not', async (t) => {
  t.match(await userfaultfdAccess({ qemuPrivileged: true, refused: true }), { via: 'none', reason: /--no-postcopy/ }, '--no-postcopy wins over everything');
  t.same(await userfaultfdAccess({ qemuPrivileged: true, refused: false }), { via: 'privileged' });
  const missing = await userfaultfdAccess({ qemuPrivileged: false, refused: false, preload: '/nonexistent/userfaultfd-preload.so' });
  if (sysctlAllows) {
    t.same(missing, { via: 'sysctl' }, 'the sysctl lets every process');
  } else {
    t.equal(missing.via, 'none', 'no preload: no way for qemu 7.2 to use the device');
    t.match(missing.via === 'none' ? missing.reason : '', /vm\.unprivileged_userfaultfd=1/, 'says what would');
    const found = await userfaultfdAccess({ qemuPrivileged: false, refused: false });
    if (isRoot && fs.existsSync(USERFAULTFD_DEVICE)) t.same(found, { via: 'device', preload: USERFAULTFD_PRELOAD }, 'root, the device and the built preload');
    else t.equal(found.via, 'none', `not root or no ${USERFAULTFD_DEVICE}: none`);
  }
});

t.test('an unprivileged qemu 7.2 takes postcopy with the device handed over, and without it only where the sysctl allows', { skip: isRoot && fs.existsSync(USERFAULTFD_DEVICE) && fs.existsSync(USERFAULTFD_PRELOAD) ? false : `needs root, ${USERFAULTFD_DEVICE} and the built preload` }, async (t) => {
  const enable = { capabilities: [{ capability: 'postcopy-ram', state: true }] };
  for (const granted of [false, true]) {
    const dir = await tmpDir(t);
    // qemu, as its own user, writes its pidfile and binds its monitor socket here.
    await fsp.chmod(dir, 0o777);
    const deviceFd = granted ? openUserfaultfdDevice() : undefined;
    const spec = { ...launchSpec(dir, [...minimalArgv(), '-incoming', 'defer']), credentials: QEMU_USER, ...(deviceFd !== undefined ? { userfaultfd: { deviceFd, preload: USERFAULTFD_PRELOAD } } : {}) };
    const { record, qmp } = await guests.launch(t, spec).finally(() => deviceFd !== undefined && fs.closeSync(deviceFd));
    t.equal(fs.statSync(`/proc/${record.pid}`).uid, QEMU_USER.uid, 'qemu runs as the unprivileged user');
    const taken = qmp.execute('migrate-set-capabilities', enable);
    if (granted || sysctlAllows) await t.resolves(taken, granted ? 'with the device: postcopy-ram is on' : 'the sysctl allows it anyway');
    else await t.rejects(taken, /Postcopy is not supported/, 'without it qemu cannot take postcopy');
    const environ = fs.readFileSync(`/proc/${record.pid}/environ`, 'utf8').split('\0');
    t.equal(environ.some((e) => e.startsWith('LD_PRELOAD=')), granted, granted ? 'the preload is loaded' : 'and no preload');
  }
});

guests.checkNoneLeft(t);
