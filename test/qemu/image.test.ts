/** The files a disk image names in its header, read from images made by the real qemu-img. */
import { execa } from 'execa';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { imageFileRefs, MAX_CHAIN_DEPTH, type ImageFileRef } from '../../src/qemu/image.js';
import { tmpDir } from './helpers.js';

async function qemuImg(...args: string[]): Promise<void> {
  await execa('qemu-img', args);
}

/** Turn the backing-format header extension into one qemu ignores (an unknown type). */
async function forgetBackingFormat(image: string): Promise<void> {
  const buf = await fs.readFile(image);
  let offset = buf.readUInt32BE(100); // v3 header length
  for (let i = 0; i < 64 && buf.readUInt32BE(offset) !== 0; i++) {
    if (buf.readUInt32BE(offset) === 0xe2792aca) buf.writeUInt32BE(0x0badf00d, offset);
    offset += 8 + Math.ceil(buf.readUInt32BE(offset + 4) / 8) * 8;
  }
  await fs.writeFile(image, buf);
}

/** All refs, each one recorded by the check callback too (which must see every file before it is opened). */
async function chain(image: string, format: 'raw' | 'qcow2' = 'qcow2') {
  const checked: string[] = [];
  const refs = await imageFileRefs(image, format, async (ref: ImageFileRef) => {
    checked.push(ref.path);
  });
  return { refs, checked };
}

t.test('raw and a qcow2 without backing name nothing else', async (t) => {
  const dir = await tmpDir(t);
  await qemuImg('create', '-f', 'raw', path.join(dir, 'a.raw'), '1M');
  await qemuImg('create', '-f', 'qcow2', path.join(dir, 'a.qcow2'), '1M');
  t.same((await chain(path.join(dir, 'a.raw'), 'raw')).refs, []);
  t.same((await chain(path.join(dir, 'a.qcow2'))).refs, []);
});

t.test('a chain: absolute and relative names, with and without a recorded backing format', async (t) => {
  const dir = await tmpDir(t);
  await fs.mkdir(path.join(dir, 'sub'));
  const base = path.join(dir, 'base.raw');
  const mid = path.join(dir, 'sub', 'mid.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'raw', base, '1M');
  await qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'raw', mid);
  // Relative to the directory of the image that names it, as qemu resolves it.
  await qemuImg('create', '-f', 'qcow2', '-b', 'sub/mid.qcow2', '-F', 'qcow2', top);
  const { refs, checked } = await chain(top);
  t.same(refs, [
    { role: 'backing', path: mid, from: top, format: 'qcow2' },
    { role: 'backing', path: base, from: mid, format: 'raw' },
  ]);
  t.same(checked, [mid, base], 'every file checked, top to bottom');

  // No backing format recorded (qemu-img no longer writes such images, older ones exist): qemu
  // would probe the file, and a probe can take it for a VMDK descriptor naming any host file.
  await forgetBackingFormat(top);
  const info = JSON.parse((await execa('qemu-img', ['info', '--output=json', top])).stdout) as Record<string, unknown>;
  t.equal(info['backing-filename'], 'sub/mid.qcow2');
  t.notOk('backing-filename-format' in info, 'qemu-img sees no backing format either');
  await t.rejects(chain(top), { code: 'image_backing_format_missing', message: /record it: qemu-img rebase -u -b sub\/mid.qcow2 -F raw\|qcow2/ }, 'refused, saying how to record it');
});

t.test('a relative backing name reaches the check as the kernel walks it', async (t) => {
  const dir = await tmpDir(t);
  await fs.mkdir(path.join(dir, 'deep', 'down'), { recursive: true });
  await fs.symlink(path.join(dir, 'deep', 'down'), path.join(dir, 'lnk'));
  const base = path.join(dir, 'deep', 'x.raw');
  await qemuImg('create', '-f', 'raw', base, '1M');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-b', 'lnk/../x.raw', '-F', 'raw', top);
  const { checked } = await chain(top);
  t.same(checked, [`${dir}/lnk/../x.raw`], 'not folded to dir/x.raw');
  t.equal(await fs.realpath(checked[0]!), base, 'which the kernel takes to deep/x.raw, through the link');
});

t.test('an external data file is named', async (t) => {
  const dir = await tmpDir(t);
  const data = path.join(dir, 'data.raw');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', `data_file=${data}`, top, '1M');
  t.same((await chain(top)).refs, [{ role: 'data-file', path: data, from: top }]);
});

t.test('the check runs before a file is read: a refusal stops the walk', async (t) => {
  const dir = await tmpDir(t);
  const base = path.join(dir, 'base.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'qcow2', base, '1M');
  await qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
  await fs.rm(base);
  // base is gone: had the walk read it first, this would be ENOENT instead of the check's error.
  await t.rejects(
    imageFileRefs(top, 'qcow2', async (ref) => {
      throw new Error(`refused ${ref.path}`);
    }),
    { message: `refused ${base}` },
  );
});

t.test('refused: protocols, loops, depth, bad headers, other formats', async (t) => {
  const dir = await tmpDir(t);
  const a = path.join(dir, 'a.qcow2');
  const b = path.join(dir, 'b.qcow2');
  await qemuImg('create', '-f', 'qcow2', a, '1M');
  await qemuImg('create', '-f', 'qcow2', b, '1M');

  for (const proto of ['nbd://127.0.0.1:1/x', 'json:{"driver":"file","filename":"/etc/passwd"}', 'http:/x']) {
    await qemuImg('rebase', '-u', '-b', proto, '-F', 'raw', a);
    await t.rejects(chain(a), { name: 'ImageError', code: 'image_protocol_refused' }, `backing ${proto}`);
  }
  // A name with a colon after a slash is a local file for qemu.
  await fs.mkdir(path.join(dir, 'x:y'));
  await qemuImg('create', '-f', 'raw', path.join(dir, 'x:y', 'z.raw'), '1M');
  await qemuImg('rebase', '-u', '-b', './x:y/z.raw', '-F', 'raw', a);
  t.same((await chain(a)).refs.map((r) => r.path), [`${dir}/./x:y/z.raw`], 'as qemu will open it, beside the naming image');

  await qemuImg('rebase', '-u', '-b', b, '-F', 'qcow2', a);
  await qemuImg('rebase', '-u', '-b', a, '-F', 'qcow2', b);
  await t.rejects(chain(a), { code: 'image_invalid', message: /loops/ }, 'a loop');

  const deep: string[] = [];
  for (let i = 0; i <= MAX_CHAIN_DEPTH; i++) {
    const img = path.join(dir, `d${i}.qcow2`);
    if (i === 0) await qemuImg('create', '-f', 'qcow2', img, '1M');
    else await qemuImg('create', '-f', 'qcow2', '-b', deep[i - 1]!, '-F', 'qcow2', img);
    deep.push(img);
  }
  await t.rejects(chain(deep.at(-1)!), { code: 'image_invalid', message: /deeper than/ }, 'too deep');
  t.equal((await chain(deep.at(-2)!)).refs.length, MAX_CHAIN_DEPTH - 1, 'one less is fine');

  const vmdk = path.join(dir, 'base.vmdk');
  await qemuImg('create', '-f', 'vmdk', vmdk, '1M');
  await qemuImg('rebase', '-u', '-b', vmdk, '-F', 'vmdk', a);
  await t.rejects(chain(a), { code: 'image_format_refused' }, 'a vmdk backing file');

  const raw = path.join(dir, 'plain.raw');
  await fs.writeFile(raw, Buffer.alloc(4096));
  await t.rejects(chain(raw), { code: 'image_format_mismatch' }, 'declared qcow2, is not');

  // Hand-made damage: name past the end of the file, NUL in the name, bad cluster size.
  const header = await fs.readFile(b);
  const damaged = path.join(dir, 'damaged.qcow2');
  const patch = async (edit: (buf: Buffer) => void) => {
    const buf = Buffer.from(header);
    edit(buf);
    await fs.writeFile(damaged, buf);
  };
  await patch((buf) => buf.writeBigUInt64BE(BigInt(header.length + 10), 8));
  await t.rejects(chain(damaged), { code: 'image_invalid', message: /past the end/ });
  await patch((buf) => buf.writeUInt32BE(2000, 16));
  await t.rejects(chain(damaged), { code: 'image_invalid', message: /longer than/ });
  await patch((buf) => buf.writeUInt32BE(40, 20));
  await t.rejects(chain(damaged), { code: 'image_invalid', message: /cluster_bits/ });
  await patch((buf) => {
    const at = Number(buf.readBigUInt64BE(8));
    buf[at + 1] = 0;
  });
  await t.rejects(chain(damaged), { code: 'image_invalid', message: /NUL/ });
});
