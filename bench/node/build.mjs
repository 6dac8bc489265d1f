// Bundles each handler to dist/<fn>.js as a performance-minded Lambda team does (CDK
// NodejsFunction / SST): one minified ESM file per function, dependencies included, no
// node_modules at run time. `node dist/<fn>.js` is what the harness starts.

import { build } from 'esbuild';

// Chat only: the webhook and checkout baselines implemented the SQL contract that issue 20
// replaced (see README.md).
for (const fn of ['chat']) {
  await build({
    entryPoints: [`src/${fn}.js`],
    outfile: `dist/${fn}.js`,
    bundle: true,
    minify: true,
    platform: 'node',
    target: 'node20',
    format: 'esm',
    legalComments: 'none',
    // CommonJS dependencies that require() Node built-ins need a require in ESM output.
    banner: { js: "import{createRequire as __cr}from'node:module';const require=__cr(import.meta.url);" },
    logLevel: 'warning',
  });
}
