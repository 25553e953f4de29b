/**
 * The files a disk image makes qemu open besides itself. A qcow2 header can name a backing file
 * (and a v3 one an external data file) that qemu opens on its own when the domain XML names only
 * the top image; the agent reads those names here so that they pass the same --allow-path check
 * as the paths the XML names.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';

export type ImageFormat = 'raw' | 'qcow2';

export interface ImageFileRef {
  role: 'backing' | 'data-file';
  /** As resolved by qemu: relative names are taken relative to the directory of the image naming them. */
  path: string;
  /** The image that names it. */
  from: string;
  format?: ImageFormat;
}

export class ImageError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = 'ImageError';
    this.code = code;
  }
}

const QCOW2_MAGIC = 0x514649fb; // 'QFI\xfb'
const QCOW2_V2_HEADER_LENGTH = 72;
const EXT_END = 0;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_DATA_FILE = 0x44415441;
/** qemu's own limit on a backing file name. */
const MAX_NAME_BYTES = 1023;
const QCOW2_V3_HEADER_LENGTH = 104;
/** Clusters are 512 bytes to 2 MiB; header and extensions lie in the first one. */
const MIN_CLUSTER_BITS = 9;
const MAX_CLUSTER_BITS = 21;
/** Longer chains than this are refused rather than followed (and loops end here too). */
export const MAX_CHAIN_DEPTH = 16;

interface Qcow2Header {
  backing?: string;
  backingFormat?: string;
  dataFile?: string;
}

async function readAt(file: fs.FileHandle, position: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  const { bytesRead } = await file.read(buf, 0, length, position);
  return buf.subarray(0, bytesRead);
}

function name(buf: Buffer, image: string, what: string): string {
  const text = buf.toString('utf8');
  if (text.includes('\0')) throw new ImageError('image_invalid', `${image}: the ${what} name holds a NUL byte`);
  return text;
}

/** The names a qcow2 header holds; null when the file has no qcow2 magic (qemu's probe says raw). */
async function readQcow2Header(image: string): Promise<Qcow2Header | null> {
  const file = await fs.open(image, 'r');
  try {
    const fixed = await readAt(file, 0, QCOW2_V3_HEADER_LENGTH);
    if (fixed.length < QCOW2_V2_HEADER_LENGTH || fixed.readUInt32BE(0) !== QCOW2_MAGIC) return null;
    const version = fixed.readUInt32BE(4);
    if (version !== 2 && version !== 3) throw new ImageError('image_invalid', `${image}: unsupported qcow2 version ${version}`);
    const clusterBits = fixed.readUInt32BE(20);
    if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) throw new ImageError('image_invalid', `${image}: cluster_bits ${clusterBits} out of range`);
    const header: Qcow2Header = {};
    const backingOffset = Number(fixed.readBigUInt64BE(8));
    const backingSize = fixed.readUInt32BE(16);
    if (backingOffset !== 0 && backingSize !== 0) {
      if (backingSize > MAX_NAME_BYTES) throw new ImageError('image_invalid', `${image}: backing file name longer than ${MAX_NAME_BYTES} bytes`);
      const raw = await readAt(file, backingOffset, backingSize);
      if (raw.length !== backingSize) throw new ImageError('image_invalid', `${image}: backing file name lies past the end of the image`);
      header.backing = name(raw, image, 'backing file');
    }
    // Header extensions follow the header (v3 says how long it is), within the first cluster
    // and before the backing file name, up to the end marker (as qemu reads them).
    const headerLength = version === 3 && fixed.length >= QCOW2_V3_HEADER_LENGTH ? fixed.readUInt32BE(100) : QCOW2_V2_HEADER_LENGTH;
    const clusterSize = 2 ** clusterBits;
    const extEnd = backingOffset > 0 && backingOffset < clusterSize ? backingOffset : clusterSize;
    const exts = await readAt(file, headerLength, Math.max(extEnd - headerLength, 0));
    for (let offset = 0; offset + 8 <= exts.length; ) {
      const type = exts.readUInt32BE(offset);
      const length = exts.readUInt32BE(offset + 4);
      if (type === EXT_END) break;
      if (offset + 8 + length > exts.length) throw new ImageError('image_invalid', `${image}: header extension runs past the first cluster`);
      const data = exts.subarray(offset + 8, offset + 8 + length);
      if (type === EXT_BACKING_FORMAT) header.backingFormat = name(data, image, 'backing format');
      if (type === EXT_DATA_FILE) header.dataFile = name(data, image, 'data file');
      offset += 8 + Math.ceil(length / 8) * 8;
    }
    return header;
  } finally {
    await file.close();
  }
}

/** A name qemu would hand to a protocol driver (nbd:, http:, json:{...}) instead of opening a local file. */
function hasProtocol(filename: string): boolean {
  const colon = filename.indexOf(':');
  const slash = filename.indexOf('/');
  return colon > 0 && (slash < 0 || colon < slash);
}

/**
 * Where qemu looks for a relative name: beside the naming image. Not normalised: `lnk/../x`
 * must reach the checks as the kernel will walk it (through the link), not as text folds it.
 */
function resolveRelative(from: string, filename: string): string {
  return path.isAbsolute(filename) ? filename : `${path.dirname(from)}/${filename}`;
}

/**
 * Every file the image makes qemu open beyond itself, following the backing chain to its end.
 * `check` sees each one before it is opened, so a file outside the allowed roots is never read.
 */
export async function imageFileRefs(image: string, format: ImageFormat, check: (ref: ImageFileRef) => Promise<void>): Promise<ImageFileRef[]> {
  const refs: ImageFileRef[] = [];
  const seen = new Set<string>();
  const notQcow2 = (file: string) => new ImageError('image_format_mismatch', `${file} is declared qcow2 but has no qcow2 header`);
  let current = image;
  let header = format === 'qcow2' ? await readQcow2Header(image) : null;
  if (format === 'qcow2' && !header) throw notQcow2(image);
  for (let depth = 0; header; depth++) {
    const real = await fs.realpath(current);
    if (seen.has(real)) throw new ImageError('image_invalid', `${image}: the backing chain loops back to ${current}`);
    seen.add(real);
    if (depth >= MAX_CHAIN_DEPTH) throw new ImageError('image_invalid', `${image}: backing chain deeper than ${MAX_CHAIN_DEPTH}`);
    if (header.dataFile !== undefined) {
      if (hasProtocol(header.dataFile)) throw new ImageError('image_protocol_refused', `${current}: data file ${header.dataFile} is not a local file`);
      const ref: ImageFileRef = { role: 'data-file', path: resolveRelative(current, header.dataFile), from: current };
      await check(ref);
      refs.push(ref);
    }
    if (header.backing === undefined) break;
    if (hasProtocol(header.backing)) throw new ImageError('image_protocol_refused', `${current}: backing file ${header.backing} is not a local file`);
    const backing = resolveRelative(current, header.backing);
    const ref: ImageFileRef = { role: 'backing', path: backing, from: current };
    await check(ref);
    const recorded = header.backingFormat;
    // qemu would probe such a file, and a probe can take it for a VMDK descriptor that names any file.
    if (recorded === undefined) {
      throw new ImageError(
        'image_backing_format_missing',
        `${current}: no format recorded for its backing file ${header.backing}; record it: qemu-img rebase -u -b ${header.backing} -F raw|qcow2 ${current}`,
      );
    }
    if (recorded !== 'raw' && recorded !== 'qcow2') {
      throw new ImageError('image_format_refused', `${current}: backing format ${recorded} is not one the agent runs (raw, qcow2)`);
    }
    // A raw backing file is opened as it is; a qcow2 one is read for the next link.
    const next = recorded === 'raw' ? null : await readQcow2Header(backing);
    if (recorded === 'qcow2' && !next) throw notQcow2(backing);
    ref.format = next ? 'qcow2' : 'raw';
    refs.push(ref);
    current = backing;
    header = next;
  }
  return refs;
}
