// The original design's API (docs: the design this project started from),
// as a reference for the benchmark: Express receives `POST /event`, pushes
// the event onto a Redis list with LPUSH and answers at once. No validation
// beyond the design's, no ids, no batching, no queue limit: the least the
// original system did per event. Run by `evtrack-bench run` (ingest section)
// with PORT and REDIS_URL set; not part of the service.
'use strict';

const express = require('express');
const { createClient } = require('redis');

async function main() {
  const port = Number(process.env.PORT || 3000);
  const redis = createClient({ url: process.env.REDIS_URL || 'redis://127.0.0.1:6379' });
  redis.on('error', (err) => console.error('redis:', err.message));
  await redis.connect();

  const app = express();
  app.use(express.json());

  // The design's event controller: the fields it names, a receive time,
  // pushed as JSON for the worker's BRPOP.
  app.post('/event', async (req, res) => {
    const { site_id, event_type, path, userid, timestamp } = req.body || {};
    if (!site_id || !event_type) {
      return res.status(400).json({ success: false, message: 'site_id and event_type are required' });
    }
    const event = {
      site_id,
      event_type,
      path,
      userid,
      timestamp: timestamp ? new Date(timestamp) : new Date(),
      createdAt: new Date(),
    };
    try {
      await redis.lPush('events', JSON.stringify(event));
      res.status(202).json({ success: true });
    } catch (err) {
      res.status(500).json({ success: false, message: 'queue unavailable' });
    }
  });

  // Not in the design: the benchmark waits for this before the load.
  app.get('/health', (req, res) => res.json({ status: 'ok' }));

  app.listen(port, '127.0.0.1', () => console.log(`original design API on ${port}`));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
