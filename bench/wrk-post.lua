-- wrk script used by bench/run.sh: POST the SendNotification fixture.
--   WRK_BODY  path of the request body (bench/send-notification-events.xml)
--   WRK_JSON  where done() writes the summary as one JSON object
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "text/xml; charset=utf-8"
wrk.headers["SOAPAction"] = '"http://schemas.microsoft.com/exchange/services/2006/messages/SendNotification"'
wrk.headers["User-Agent"] = "ExchangeServicesClient/15.20 (ews-relay bench)"

function done(summary, latency, requests)
   local out = os.getenv("WRK_JSON")
   if not out then return end
   local e = summary.errors
   local j = assert(io.open(out, "w"))
   j:write(string.format(
      '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max))
   j:close()
end
