// Checks the TextMate grammar: valid JSON, every regex compiles (as Oniguruma
// would, approximated by JavaScript's engine), and key tokens match.
"use strict";
const assert = require("assert");
const grammar = require("../syntaxes/routeplane.tmLanguage.json");

const regexes = [];
(function walk(node) {
  if (Array.isArray(node)) return node.forEach(walk);
  if (node && typeof node === "object") {
    for (const [k, v] of Object.entries(node)) {
      if (["match", "begin", "end"].includes(k)) regexes.push(v);
      else walk(v);
    }
  }
})(grammar);
assert.ok(regexes.length > 10, "grammar has patterns");
for (const r of regexes) new RegExp(r, "m");

const find = (name) => new RegExp(grammar.repository[name].match, "m");
assert.ok(find("path").test("when tenant.plan == free"));
assert.ok(find("quantity").test("price in $0.15 out $0.60 per 1M"));
assert.ok(find("item").test("model gpt-4o-mini {"));
console.log(`grammar ok: ${regexes.length} patterns compile`);
