"""Input-grounded prompts for the n-gram speculative-decoding benchmark (benchmarks/speculative.py): a fixed
document of about 1,000 tokens (written for this benchmark) and tasks whose answers copy from it: summarise, edit,
extract. Chat messages, for LLM.chat / the chat template."""

from __future__ import annotations

DOCUMENT = """\
Harbour Street Community Garden: annual report

1. Overview
The Harbour Street Community Garden completed its fourth full season this year. The garden occupies a former car park
behind the public library and is run by volunteers from the neighbourhood association. This year 46 households held a
plot, up from 38 last year, and the waiting list grew to 19 households. The shared beds along the north wall produced
vegetables for the weekly food bank on Thursdays, and the herb spiral by the gate was rebuilt in April after the winter
storms damaged its stone edging.

2. Plots and members
Each household pays an annual fee of 25 pounds for a standard plot of four by two metres, or 15 pounds for a half plot.
Fees are waived for members who volunteer at least twenty hours a year on shared tasks. Nine members used the waiver
this year. Two raised beds near the entrance were rebuilt at a height of 80 centimetres so that members who use a
wheelchair can garden without bending. The committee asks every member to keep their plot tidy, to compost green
waste in the bays at the back, and to return shared tools to the shed before leaving.

3. Water
The garden collects rainwater from the library roof into six tanks with a total capacity of 7,200 litres. In July the
tanks ran dry for eleven days and the garden used mains water from the library's outside tap, which cost 64 pounds.
The committee proposes adding two more tanks next spring, which would raise the capacity to 9,600 litres, and fitting
a drip line to the shared beds so that less water is lost to evaporation in hot weather.

4. Harvest and the food bank
Members weighed the produce from the shared beds every Saturday. The shared beds produced 412 kilograms of vegetables
this season: 138 kilograms of potatoes, 87 kilograms of courgettes, 64 kilograms of tomatoes, 51 kilograms of beans,
43 kilograms of onions and 29 kilograms of salad leaves. All of it went to the food bank. The food bank coordinator
wrote to thank the garden and said that fresh vegetables are the item their visitors ask for most often.

5. Events
The garden held three open days, in May, July and September, with about 300 visitors in total. The September open day
included a seed swap, a soup stall run by the youth club, and a talk on saving tomato seeds by a member who has grown
the same variety for twenty years. Four schools visited during term time, and each class planted a row of broad beans
in the education bed. The committee would like to run a winter workshop on pruning fruit trees if a volunteer can lead it.

6. Money
Income this year was 1,410 pounds: 1,050 pounds from plot fees, 240 pounds from the open days and 120 pounds from a
grant by the local council. Spending was 1,186 pounds: 420 pounds for timber and soil for the raised beds, 310 pounds
for seeds and plants, 228 pounds for tools and repairs, 164 pounds for insurance and 64 pounds for mains water. The
garden ends the year with 1,302 pounds in its account, which the committee proposes to spend partly on the new water
tanks, which are expected to cost about 480 pounds including fittings.

7. Problems
Slugs damaged many of the lettuces in June, and the committee reminds members not to use slug pellets, which are
harmful to hedgehogs and birds; beer traps and copper tape worked well on several plots. The compost bays were
overfull in August because woody material was added without being cut up. Two bicycles were stolen from the rack by
the gate, and the committee has asked the library to extend its camera to cover the rack.

8. Next year
The committee proposes the following for next year: add two rainwater tanks and a drip line; build a second
accessible raised bed; run the winter pruning workshop; start a tool library so that members can borrow larger tools
such as a rotavator; and hold the annual general meeting on the first Saturday of March in the library's meeting room.
Members who would like to join the committee should speak to the secretary before the end of January.
"""

TASKS = [
    "Summarise the report above in about five sentences, keeping its figures.",
    "Copy section 6 (Money) of the report above exactly, but write every amount in pounds with a pound sign, "
    "for example £25 instead of 25 pounds.",
    "List every figure in kilograms from section 4 of the report above, one per line, in the form "
    "'vegetable: kilograms'.",
    "Rewrite section 3 (Water) of the report above in the first person plural (we, our), changing nothing else.",
    "Extract the committee's proposals for next year from the report above as a bulleted list, using the "
    "report's own words.",
    "Copy section 7 (Problems) of the report above, replacing every full stop at the end of a sentence with an "
    "exclamation mark.",
]


def grounded_messages() -> list[list[dict[str, str]]]:
    """One chat conversation per task: the document, then the task."""
    return [[{"role": "user", "content": f"{DOCUMENT}\n{task}"}] for task in TASKS]
