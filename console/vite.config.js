// The console's build: one deterministic bundle under ../assets/console, which the server
// embeds (src/api/console.rs). `npm run dev` serves the sources and forwards grpc-web calls to a
// local `turbocat dev` on :8080 (or TURBOCAT_URL).
import { defineConfig } from 'vite';

export default defineConfig({
  base: '/',
  build: {
    outDir: '../assets/console',
    emptyOutDir: true,
    assetsDir: 'assets',
    sourcemap: false,
    target: 'es2022',
    modulePreload: { polyfill: false },
    reportCompressedSize: false,
  },
  server: {
    // The console calls only the grpc-web paths; /api is forwarded for curl and the docs.
    proxy: Object.fromEntries(
      ['/turbocat.v1.', '/api/'].map((path) => [path, process.env.TURBOCAT_URL ?? 'http://127.0.0.1:8080']),
    ),
  },
});
