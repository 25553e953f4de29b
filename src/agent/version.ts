import { readFileSync } from 'node:fs';
import { packageRoot } from './package-root.js';
import path from 'node:path';

export const version: string = JSON.parse(readFileSync(path.join(packageRoot, 'package.json'), 'utf8')).version;
