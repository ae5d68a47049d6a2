// Drives the real Jaeger UI (served by the lab's query API) in headless
// Chromium and prints what a person would see, as JSON on stdout; the Rust
// test (lab/tests/browser.rs) asserts on it. Environment:
//   PUPPETEER_CORE  the puppeteer-core package directory
//   CHROMIUM        the browser executable
//   BASE            the UI's address, e.g. http://127.0.0.1:16686
//   SERVICE, GAP    the search: spans of SERVICE tagged tracegap.gap=GAP
//   TRACE_ID        a trace the search must find
//   QUALITY_SERVICE the service whose Trace Quality page is opened
//   SHOTS           where the screenshots go
'use strict';
const puppeteer = require(process.env.PUPPETEER_CORE);
const path = require('path');

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};

async function settle(page) {
  await page.waitForNetworkIdle({ idleTime: 300, timeout: 15000 }).catch(() => {});
}

(async () => {
  const base = env('BASE');
  const shots = env('SHOTS');
  const facts = { pageErrors: [], failedRequests: [] };
  const browser = await puppeteer.launch({
    executablePath: env('CHROMIUM'),
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1400, height: 900 });
    page.on('pageerror', (e) => facts.pageErrors.push(String(e)));
    page.on('response', (r) => {
      if (r.status() >= 400) facts.failedRequests.push(`${r.status()} ${r.url()}`);
    });

    // 1. Search by tag, as a person types it in the search form's URL.
    const tags = JSON.stringify({ 'tracegap.gap': env('GAP') });
    const search = `${base}/search?service=${encodeURIComponent(env('SERVICE'))}` +
      `&tags=${encodeURIComponent(tags)}&limit=20&lookback=2d`;
    await page.goto(search, { waitUntil: 'networkidle0' });
    await page.waitForSelector('.ResultItem', { timeout: 15000 }).catch(() => {});
    await settle(page);
    facts.search = await page.evaluate(() => ({
      results: document.querySelectorAll('.ResultItem').length,
      ids: [...document.querySelectorAll('.ResultItemTitle--idExcerpt')].map((e) => e.innerText.trim()),
      servicesFound: !document.body.innerText.includes('Error loading services'),
    }));
    await page.screenshot({ path: path.join(shots, 'search.png') });

    // 2. The trace: the rows as the timeline nests them, and the synthetic
    //    span's details (tags, process) once its row is opened.
    await page.goto(`${base}/trace/${env('TRACE_ID')}`, { waitUntil: 'networkidle0' });
    await page.waitForSelector('.span-row', { timeout: 15000 });
    facts.trace = await page.evaluate(() => ({
      rows: [...document.querySelectorAll('.span-row')].map((r) => ({
        service: (r.querySelector('.span-svc-name') || {}).innerText?.trim(),
        name: (r.querySelector('.span-name') || {}).innerText?.trim(),
        depth: r.querySelectorAll('.SpanTreeOffset--indentGuide').length,
      })),
      header: (document.querySelector('.TracePageHeader') || {}).innerText || '',
      incomplete: /incomplete/i.test(document.body.innerText),
    }));
    const opened = await page.evaluate((svc) => {
      const row = [...document.querySelectorAll('.span-row')].find((r) =>
        (r.querySelector('.span-svc-name') || {}).innerText?.trim() === svc);
      if (!row) return false;
      row.querySelector('.span-name').click();
      return true;
    }, env('SERVICE'));
    if (opened) await page.waitForSelector('.detail-row', { timeout: 5000 }).catch(() => {});
    facts.trace.detail = await page.evaluate(() =>
      (document.querySelector('.detail-row') || {}).innerText || '');
    await page.screenshot({ path: path.join(shots, 'trace.png') });

    // 3. A trace with a span whose parent was never recorded: not called
    //    incomplete, and the span's warning says why.
    if (process.env.ORPHAN_TRACE_ID) {
      await page.goto(`${base}/trace/${process.env.ORPHAN_TRACE_ID}`, { waitUntil: 'networkidle0' });
      await page.waitForSelector('.span-row', { timeout: 15000 });
      await page.evaluate(() => document.querySelectorAll('.span-row .span-name').forEach((n) => n.click()));
      await page.waitForSelector('.detail-row', { timeout: 5000 }).catch(() => {});
      await page.evaluate(() => document.querySelectorAll('.AccordianWarnings--header')
        .forEach((e) => e.click()));
      await new Promise((r) => setTimeout(r, 500));
      facts.orphan = await page.evaluate(() => ({
        incomplete: /incomplete/i.test(document.body.innerText),
        details: [...document.querySelectorAll('.detail-row')].map((d) => d.innerText),
      }));
      await page.screenshot({ path: path.join(shots, 'orphan.png') });
    }

    // 4. The Trace Quality page, and where its failing examples lead.
    await page.goto(`${base}/quality-metrics?service=${encodeURIComponent(env('QUALITY_SERVICE'))}`,
      { waitUntil: 'networkidle0' });
    await page.waitForSelector('.MetricCard', { timeout: 15000 }).catch(() => {});
    await settle(page);
    facts.quality = await page.evaluate(() => ({
      scores: [...document.querySelectorAll('.ScoreCard')].map((c) => c.innerText.replace(/\s+/g, ' ').trim()),
      metrics: [...document.querySelectorAll('.MetricCard')].map((c) => {
        const counts = {};
        c.querySelectorAll('.CountCard').forEach((cc) => {
          const title = (cc.querySelector('.CountCard--TitleHeader') || {}).innerText?.trim();
          const n = Number((cc.querySelector('.CountCard--Count') || {}).innerText);
          if (title) counts[title] = n;
        });
        return {
          name: (c.querySelector('.MetricCard--TitleHeader') || {}).innerText?.trim(),
          counts,
          examples: [...c.querySelectorAll('a')].map((a) => a.href).filter((h) => h.includes('traceID=')),
        };
      }),
    }));
    await page.screenshot({ path: path.join(shots, 'quality.png'), fullPage: true });
    const failing = facts.quality.metrics.find((m) => m.examples.length > 0);
    if (failing) {
      await page.goto(failing.examples[0], { waitUntil: 'networkidle0' });
      await page.waitForSelector('.ResultItem', { timeout: 15000 }).catch(() => {});
      facts.quality.exampleResults = await page.evaluate(() =>
        document.querySelectorAll('.ResultItem').length);
    }
  } catch (e) {
    facts.error = String(e && e.stack || e);
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(facts));
})();
