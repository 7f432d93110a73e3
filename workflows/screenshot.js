// Screenshot of a workflow as the real ComfyUI frontend draws it; the thumbnails here were made with it.
// Needs Debian's chromium and `npm install playwright-core`; start ComfyUI with this pack, then:
//   node screenshot.js http://127.0.0.1:8188 osediff_upscale.json osediff_upscale.png
const { chromium } = require('playwright-core');
const fs = require('fs');
(async () => {
  const [url, workflow, out] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 1500, height: 820 } });
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  await page.goto(url, { waitUntil: 'load', timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 120000 });
  await page.waitForTimeout(3000);
  const graph = JSON.parse(fs.readFileSync(workflow, 'utf8'));
  const result = await page.evaluate(async (g) => {
    await window.app.loadGraphData(g);
    const nodes = window.app.graph._nodes;
    return nodes.map(n => ({ type: n.type, title: n.title, widgets: (n.widgets || []).map(w => [w.name, w.value]) }));
  }, graph);
  await page.waitForTimeout(1500);
  for (let i = 0; i < 3; i++) { await page.keyboard.press('Escape'); await page.waitForTimeout(300); }
  await page.evaluate(() => { window.app.canvas.ds.offset = [20, 80]; window.app.canvas.ds.scale = 1.0; window.app.graph.setDirtyCanvas(true, true); });
  await page.waitForTimeout(1500);
  await page.screenshot({ path: out });
  console.log(JSON.stringify({ result, errors }, null, 1));
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
